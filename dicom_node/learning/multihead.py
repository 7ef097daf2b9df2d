"""What a network with heads is: one shared ``encoder`` and named ``heads``.

Our U-Net (:mod:`dicom_node.learning.network`) and a MONAI network as the encoder
(:mod:`dicom_node.learning.monai_heads`) are both one; training, continual heads,
distillation, rehearsal and weights I/O take any of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.label_specs import HeadSpec


def conv_block(c_in: int, c_out: int, n_convs: int, groups: int,
               spatial_dims: int = 2) -> nn.Sequential:
    """``n_convs`` times: a 3x3 (3x3x3) convolution, GroupNorm, ReLU."""
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [
            conv(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class MultiHeadNetwork(nn.Module):
    """A shared ``encoder`` and a ``heads`` dict: ``forward(x, heads)`` returns
    ``{head name: logits (N, classes, *spatial)}`` (``H, W``, or ``D, H, W`` in 3D).
    Everything that works per head (partial labels, continual heads, distillation,
    rehearsal, the hub's parameter groups) works on any subclass; a subclass sets
    ``encoder`` and says how a head is made."""

    encoder: nn.Module
    heads: nn.ModuleDict

    def _make_head(self, head: HeadSpec) -> nn.Module:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> Any:
        """What every head reads: the encoder's output."""
        return self.encoder(x)

    def add_head(self, head: HeadSpec) -> None:
        """Add a freshly initialised head (continual classes); existing weights untouched."""
        if head.name in self.heads:
            raise ModelConfigError(f"heads.{head.name} already exists")
        device = next(self.encoder.parameters()).device
        self.heads[head.name] = self._make_head(head).to(device)

    def forward(
        self, x: torch.Tensor, heads: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        features = self.features(x)
        names = list(self.heads.keys()) if heads is None else list(heads)
        return {name: self.heads[name](features) for name in names}
