"""Networks with one shared encoder and named heads: our 2D U-Net, and (in
:mod:`dicom_node.learning.monai_heads`) a MONAI network as the encoder.

Parameter names are a contract with the hub: encoder and bottleneck parameters start
with ``encoder.``, a head's with ``heads.<head name>.``, and there is nothing else (no
buffers either: GroupNorm keeps no running statistics, so every tensor is a weight
that merges by averaging and inference does not depend on the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.external import ExternalNetwork, build_external
from dicom_node.learning.label_specs import HeadSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.multihead import MultiHeadNetwork, conv_block

LOGGER = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Levels of two convolutions; each level after the first halves the resolution."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], groups: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.levels.append(conv_block(c_prev, c, 2, groups))
            c_prev = c
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, level in enumerate(self.levels):
            if i:
                x = self.pool(x)
            x = level(x)
            features.append(x)
        return features


class DecoderHead(nn.Module):
    """Upsampling path from the bottleneck with skip connections, ending in logits."""

    def __init__(
        self, channels: tuple[int, ...], num_classes: int, n_convs: int, groups: int
    ) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deep, shallow in zip(channels[:0:-1], channels[-2::-1], strict=True):
            self.ups.append(nn.ConvTranspose2d(deep, shallow, 2, stride=2))
            self.blocks.append(conv_block(2 * shallow, shallow, n_convs, groups))
        self.out = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1], strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class MultiHeadUNet(MultiHeadNetwork):
    """Our U-Net: each head is a whole decoder over the encoder's levels (skips)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hp = config.hyperparameters
        self._hp = hp
        self.encoder = Encoder(config.preprocessing.in_channels, hp.channels, hp.norm_groups)
        self.heads = nn.ModuleDict({h.name: self._make_head(h) for h in config.heads})

    def _make_head(self, head: HeadSpec) -> DecoderHead:
        hp = self._hp
        return DecoderHead(hp.channels, head.num_classes, hp.decoder_convs, hp.norm_groups)


ARCHITECTURES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "unet2d-multihead": MultiHeadUNet,
}


# Any network a model config can name: one with heads or an external one.
SegmentationNetwork = MultiHeadNetwork | ExternalNetwork


def build_network(config: ModelConfig, code_dirs: Iterable[Path] = ()) -> SegmentationNetwork:
    """Instantiate any architecture ``config`` names: ours, a MONAI network by its
    registry name, or an operator-installed TorchScript file found under ``code_dirs``
    (see :mod:`dicom_node.learning.external`)."""
    if config.is_external:
        assert config.network is not None  # checked when the config was built
        return build_external(config.architecture, config.network, code_dirs)
    return build_model(config)


def build_model(config: ModelConfig) -> MultiHeadNetwork:
    """Instantiate the registered multi-head architecture named by ``config`` (random
    weights); external networks come from :func:`build_network`."""
    if config.has_monai_encoder:
        from dicom_node.learning.monai_heads import MonaiMultiHead  # imports MONAI

        return MonaiMultiHead(config)
    try:
        factory = ARCHITECTURES[config.architecture]
    except KeyError:
        raise ModelConfigError(
            f"architecture {config.architecture!r} is not registered "
            f"(known: {sorted(ARCHITECTURES)})"
        ) from None
    model = factory(config)
    assert isinstance(model, MultiHeadNetwork)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
