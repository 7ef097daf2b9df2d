"""A MONAI network as the shared encoder of named heads (``monai-heads:<Class>``).

An imported MONAI network (``monai:<Class>``) is one head owning every label, so what
works per head (partial labels by head, continual heads, head distillation, the hub's
per-head merge) does not apply to it. This architecture gives a MONAI network heads:

- **encoder:** the MONAI class (from the same allowlist, built from the JSON
  ``network.args``) with ``out_channels`` = the number of *features* it hands the
  heads, at the input's resolution. Its parameters are ``encoder.network.…``, one
  group, as the U-Net's encoder is.
- **heads:** per head, ``hyperparameters.decoder_convs`` 3x3 convolutions with
  GroupNorm (``norm_groups``) and ReLU over those features, then a 1x1 convolution to
  the head's classes (background + its labels). Parameters ``heads.<name>.…``; a new
  head (continual classes) is one more such block, initialised from its seed like a
  U-Net head (:func:`dicom_node.learning.continual.init_head_arrays`).
- **no buffers:** an encoder that keeps running statistics (batch norm) is refused: a
  head-only round freezes the encoder, and the statistics would still move.

So the split is: the MONAI network is the encoder, the heads are ours. Models of this
architecture train through the same code as the U-Net (:func:`~dicom_node.learning.
training.train`): on slices in 2D; in 3D (``spatial_dims`` 3, 3x3x3 head convolutions,
``preprocessing.volume`` required) on class-balanced windows of whole volumes
(:mod:`~dicom_node.learning.volume_windows`), served by the sliding-window inferer with
every head's softmax blended.

    {"architecture": "monai-heads:UNet",
     "network": {"args": {"spatial_dims": 2, "in_channels": 2, "out_channels": 16,
                          "channels": [16, 32, 64], "strides": [2, 2]}}, ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.external import (
    MONAI_HEADS_PREFIX,
    NETWORK_HEAD,
    ExternalNetwork,
    NetworkSpec,
    build_monai,
)
from dicom_node.learning.label_specs import HeadSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.multihead import MultiHeadNetwork, conv_block


class FeatureHead(nn.Module):
    """Convolutions over the encoder's features, ending in logits."""

    def __init__(self, features: int, num_classes: int, n_convs: int, groups: int,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        self.block = conv_block(features, features, n_convs, groups, spatial_dims)
        self.out = (nn.Conv3d if spatial_dims == 3 else nn.Conv2d)(features, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(features))


class MonaiMultiHead(MultiHeadNetwork):
    """``forward(x, heads)`` returns ``{head name: logits (N, classes, *spatial)}``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.network is not None  # checked when the config was built
        self._features = config.network.out_channels
        self.spatial_dims = config.network.spatial_dims
        self._hp = config.hyperparameters
        self.encoder: ExternalNetwork = build_monai(config.architecture, config.network)
        kept = [name for name, _ in self.encoder.named_buffers()]
        if kept:
            # A head-only round freezes the encoder, yet batch norm would still move its
            # running statistics, and the hub would merge them as weights.
            raise ModelConfigError(
                f"network.args: the encoder keeps running statistics ({kept[0]}, ...); a "
                "network with heads must keep none: use instance or group norm (MONAI's "
                "default), not batch norm")
        self.heads = nn.ModuleDict({h.name: self._make_head(h) for h in config.heads})

    def _make_head(self, head: HeadSpec) -> FeatureHead:
        return FeatureHead(self._features, head.num_classes, self._hp.decoder_convs,
                           self._hp.norm_groups, self.spatial_dims)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[NETWORK_HEAD]


def with_monai_unet_encoder(config: ModelConfig, features: int = 16,
                            channels: Sequence[int] = (16, 32, 64, 128),
                            spatial_dims: int = 2) -> ModelConfig:
    """``config``'s heads on a MONAI ``UNet`` encoder handing them ``features`` channels
    (each level after the first halves the resolution, as in our U-Net). In 3D the
    encoder takes one channel, the volume ``config.preprocessing.volume`` prepares."""
    in_channels = 1 if spatial_dims == 3 else config.preprocessing.in_channels
    args = {"spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": features, "channels": list(channels),
            "strides": [2] * (len(channels) - 1)}
    return replace(config, architecture=f"{MONAI_HEADS_PREFIX}UNet",
                   network=NetworkSpec(args=args))
