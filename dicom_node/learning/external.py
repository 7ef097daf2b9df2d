"""Networks the node did not write: MONAI networks by registry name, operator-installed
TorchScript files by sha256 (issue 23, "bring your own model").

Architecture names (``ModelConfig.architecture``):

- ``monai:<Class>``: a class of ``monai.networks.nets`` from :data:`MONAI_NETWORKS`,
  built with the JSON arguments of ``network.args`` (``spatial_dims`` 2 or 3,
  ``in_channels`` and ``out_channels`` among them). Nothing else is ever resolved:
  a name outside the allowlist is refused, never imported.
- ``torchscript:<sha256>``: a scripted module the operator installed on this node as
  ``<models dir>/torchscript/<sha256>.pt`` (``tessera model import --torchscript``).
  TorchScript is code, so it never comes from the hub: the node loads it only from its
  own disk, after checking the file's sha256 against the name; the hub sees and merges
  only its weights (``state_dict``), matched by parameter name.

Head/encoder split: such a network has no separate heads. It is one head named
``network`` that owns every label (output channel 0 is background, channel *i* the
head's *i*-th label), and its parameters form one group, ``network``, that the hub
merges whole from every update. Partial labels (training only some heads), continual
heads and head distillation need separate heads, i.e. our multi-head U-Net or a MONAI
network as the encoder of our heads (``monai-heads:<Class>``, see
:mod:`dicom_node.learning.monai_heads`): training refuses them on an external network
with :class:`~dicom_node.learning.errors.TrainingError`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dicom_node.learning.errors import ModelConfigError

LOGGER = logging.getLogger(__name__)

MONAI_PREFIX = "monai:"
# A MONAI network as the shared encoder of named heads (dicom_node.learning.monai_heads).
MONAI_HEADS_PREFIX = "monai-heads:"
# What refusals of head-wise training on an external network point to.
WITH_HEADS = ("a network with heads (the multi-head U-Net, or a MONAI network as the "
              f"encoder of heads: architecture '{MONAI_HEADS_PREFIX}<Class>')")
TORCHSCRIPT_PREFIX = "torchscript:"
NETWORK_HEAD = "network"
TORCHSCRIPT_DIR = "torchscript"

# The only MONAI classes a config (or an imported bundle's ``_target_``) may name.
MONAI_NETWORKS: frozenset[str] = frozenset(
    {"UNet", "BasicUNet", "SegResNet", "DynUNet", "AttentionUnet", "VNet"}
)
_SHA256_LEN = 64


class NetworkOutput(StrEnum):
    """What the network's channels hold: ``logits`` (softmax applied by the node) or
    ``probabilities`` (the network ends in a softmax already, as deepbet's does)."""

    LOGITS = "logits"
    PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class NetworkSpec:
    """An external network's description: JSON-only arguments, never code.

    For ``monai:`` networks ``args`` are the class's keyword arguments; for
    ``torchscript:`` ones they are ``spatial_dims``, ``in_channels`` and
    ``out_channels`` (what the scripted module expects and returns).
    """

    args: Mapping[str, Any] = field(default_factory=dict)
    output: NetworkOutput = NetworkOutput.LOGITS

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", NetworkOutput(self.output))
        for key in ("spatial_dims", "in_channels", "out_channels"):
            value = self.args.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"network.args.{key} must be a positive integer")
        if self.spatial_dims not in (2, 3):
            raise ModelConfigError("network.args.spatial_dims must be 2 or 3")
        _check_json(self.args, "network.args")

    @property
    def spatial_dims(self) -> int:
        return int(self.args["spatial_dims"])

    @property
    def in_channels(self) -> int:
        return int(self.args["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.args["out_channels"])

    def to_dict(self) -> dict[str, Any]:
        return {"args": dict(self.args), "output": self.output.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        if not isinstance(data, Mapping) or not isinstance(data.get("args"), Mapping):
            raise ModelConfigError("network must be an object with an 'args' object")
        return cls(args=dict(data["args"]), output=data.get("output", "logits"))


def _check_json(value: Any, where: str) -> None:
    """Arguments are plain JSON values: numbers, strings, booleans, null, lists, objects."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelConfigError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ModelConfigError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
        return
    raise ModelConfigError(f"{where}: {type(value).__name__} is not a JSON value")


def is_external(architecture: str) -> bool:
    return architecture.startswith((MONAI_PREFIX, TORCHSCRIPT_PREFIX))


def monai_class_name(architecture: str) -> str:
    """``monai:UNet`` (or ``monai-heads:UNet``) -> ``UNet``; refuses names outside
    :data:`MONAI_NETWORKS`."""
    name = architecture.removeprefix(MONAI_PREFIX).removeprefix(MONAI_HEADS_PREFIX)
    if name not in MONAI_NETWORKS:
        raise ModelConfigError(
            f"MONAI network {name[:64]!r} is not allowed (allowed: {sorted(MONAI_NETWORKS)})"
        )
    return name


def torchscript_sha256(architecture: str) -> str:
    sha = architecture.removeprefix(TORCHSCRIPT_PREFIX).lower()
    if len(sha) != _SHA256_LEN or any(c not in "0123456789abcdef" for c in sha):
        raise ModelConfigError(f"architecture {architecture[:90]!r}: expected torchscript:<sha256>")
    return sha


def check_architecture(architecture: str) -> None:
    """Validate an external architecture name without building anything."""
    if architecture.startswith(MONAI_PREFIX):
        monai_class_name(architecture)
    elif architecture.startswith(TORCHSCRIPT_PREFIX):
        torchscript_sha256(architecture)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torchscript_file(code_dirs: Iterable[Path], sha256: str) -> Path:
    """The operator-installed scripted module ``<dir>/torchscript/<sha256>.pt``.

    Raises
    ------
    ModelConfigError
        No such file in any of ``code_dirs``, or its content does not hash to ``sha256``.
    """
    searched = []
    for base in code_dirs:
        path = Path(base) / TORCHSCRIPT_DIR / f"{sha256}.pt"
        searched.append(str(path.parent))
        if path.is_file():
            actual = sha256_file(path)
            if actual != sha256:
                raise ModelConfigError(
                    f"{path}: sha256 is {actual}, the model config names {sha256}; refusing it"
                )
            return path
    raise ModelConfigError(
        f"TorchScript model {sha256[:12]}… is not installed on this node (looked in "
        f"{', '.join(searched) or 'no models directory'}); TorchScript is code and is never "
        "taken from the hub: install it with `tessera model import --torchscript`"
    )


class ExternalNetwork(nn.Module):
    """Wraps a MONAI or TorchScript network behind the node's model interface.

    ``forward(x, heads)`` returns ``{"network": logits}``; every parameter is named
    ``network.…`` (one parameter group). Networks that end in a softmax get the log of
    their probabilities as logits, so a softmax downstream returns them unchanged.
    """

    def __init__(self, network: nn.Module, spec: NetworkSpec) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        # Some networks reach one tensor by two names (DynUNet's skip_layers): the
        # state holds it once, under its first name, and loading fills in the others.
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) in first:
                self._aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    @property
    def spatial_dims(self) -> int:
        return self.spec.spatial_dims

    def forward(
        self, x: torch.Tensor, heads: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        out = self.network(x)
        if isinstance(out, list | tuple):  # deep supervision returns the full size first
            out = out[0]
        if out.ndim == x.ndim + 1:  # DynUNet's training-time stack of supervision heads
            out = out[:, 0]
        if self.spec.output is NetworkOutput.PROBABILITIES:
            out = out.float().clamp_min(1e-6).log()
        return {NETWORK_HEAD: out}


def _drop_aliases(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for alias in getattr(module, "_aliases", {}):
        state.pop(prefix + alias, None)


def _fill_aliases(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    for alias, name in getattr(module, "_aliases", {}).items():
        if prefix + name in state:
            state[prefix + alias] = state[prefix + name]


def build_monai(architecture: str, spec: NetworkSpec) -> ExternalNetwork:
    """The allowed MONAI class ``architecture`` names, built from ``spec.args`` (random
    weights)."""
    from monai.networks import nets  # heavy import, needed only for MONAI models

    cls = getattr(nets, monai_class_name(architecture))
    try:
        network = cls(**dict(spec.args))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelConfigError(f"{architecture}: bad network.args: {exc}") from exc
    return ExternalNetwork(network, spec)


def build_external(
    architecture: str, spec: NetworkSpec, code_dirs: Iterable[Path] = ()
) -> ExternalNetwork:
    """Instantiate an external network (random weights for MONAI; the scripted ones
    keep the weights in their file until the config's safetensors replace them)."""
    if architecture.startswith(MONAI_PREFIX):
        return build_monai(architecture, spec)
    if architecture.startswith(TORCHSCRIPT_PREFIX):
        path = torchscript_file(code_dirs, torchscript_sha256(architecture))
        # A local file the operator installed and whose hash the config names; bytes
        # from the network never reach torch.jit.load (invariant 4).
        scripted = torch.jit.load(str(path), map_location="cpu")
        return ExternalNetwork(scripted, spec)
    raise ModelConfigError(f"architecture {architecture[:90]!r} is not an external network")
