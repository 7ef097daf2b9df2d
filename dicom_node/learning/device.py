"""Where torch runs: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``, and mixed
precision (AMP, float16 autocast) for inference on CUDA.

The model a registry serves stays on the CPU and is shared by inference threads; a job
on CUDA runs a copy (:func:`on_device`), so no thread ever sees the shared model move.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, TypeVar

import torch
from torch import nn

from dicom_node.learning.errors import LearningError

DeviceSetting = Literal["auto", "cpu", "cuda"]
M = TypeVar("M", bound=nn.Module)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> ``cuda`` if available, else ``cpu``; ``cuda`` without one is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise LearningError("device 'cuda' is configured but torch sees no CUDA device "
                            "(set device = \"auto\" or \"cpu\")")
    if setting not in ("cpu", "cuda"):
        raise LearningError(f"device must be auto, cpu or cuda, got {setting[:16]!r}")
    return torch.device(setting)


def on_device(model: M, device: torch.device) -> M:
    """``model`` itself on the CPU; a copy on any other device."""
    if device.type == "cpu" and all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device)


def autocast(device: torch.device, amp: bool) -> AbstractContextManager[object]:
    """float16 autocast on CUDA when ``amp``; nothing otherwise (CPU stays float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()
