"""Weights I/O: safetensors plus a JSON config; never unpickles (invariant 4).

A model file is ``<stem>.safetensors`` holding every parameter, with the JSON config in
the safetensors metadata under ``tessera.config`` so that bytes alone describe the
model; ``save_model`` also writes ``<stem>.json`` beside it for people and listings.

Parameter groups (``encoder``, ``heads.<name>``) move as ``{name: numpy array}``
dicts; :func:`extract_groups` and :func:`apply_groups` are the federation boundary.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from dicom_node.learning.continual import pending_init_state
from dicom_node.learning.errors import ModelConfigError, WeightsError
from dicom_node.learning.external import NETWORK_HEAD, ExternalNetwork
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork, build_network
from dicom_node.learning.safetensors_io import MAX_HEADER_BYTES, read_metadata
from dicom_node.store.durable import SHARED_FILE, write_atomic

LOGGER = logging.getLogger(__name__)

CONFIG_KEY = "tessera.config"
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def read_file_config(path: Path | str) -> ModelConfig:
    """The config embedded in a safetensors file, reading only its header."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            data = head + fh.read(min(length, MAX_HEADER_BYTES))
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    meta = read_metadata(data)
    if CONFIG_KEY not in meta:
        raise WeightsError(f"{path} has no embedded {CONFIG_KEY!r}")
    try:
        return ModelConfig.from_json(meta[CONFIG_KEY])
    except ModelConfigError as exc:
        raise WeightsError(f"{path}: embedded config is invalid: {exc}") from exc


def arrays_to_bytes(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named numpy arrays (an update, a parameter group) as safetensors."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return np_save(contiguous, metadata=dict(metadata) if metadata else None)


def arrays_from_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Inverse of :func:`arrays_to_bytes`: ``(arrays, metadata)``."""
    metadata = read_metadata(data)
    try:
        return dict(np_load(data)), metadata
    except (SafetensorError, ValueError) as exc:
        raise WeightsError(f"cannot read safetensors: {exc}") from exc


# -- whole models ------------------------------------------------------------------------
def model_to_bytes(
    model: SegmentationNetwork, config: ModelConfig, *, dtype: torch.dtype = torch.float32
) -> bytes:
    """The model's weights as safetensors bytes with the config in the metadata.

    Floating tensors are stored as ``dtype``; integer buffers (a BatchNorm's batch
    count in an external network) keep theirs.
    """
    check_state(model.state_dict(), config, model=model)
    state = {k: _as_dtype(v.detach().to("cpu"), dtype).contiguous()
             for k, v in model.state_dict().items()}
    return torch_save(state, metadata={CONFIG_KEY: config.to_json()})


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.dtype in _FLOAT_DTYPES else tensor


def model_from_bytes(
    data: bytes, config: ModelConfig | None = None, *, code_dirs: Iterable[Path] = ()
) -> tuple[SegmentationNetwork, ModelConfig]:
    """Rebuild a model from safetensors bytes; the config defaults to the embedded one.

    Pending added heads missing from ``data`` are initialised from their seed
    (:mod:`dicom_node.learning.continual`). A ``torchscript:<sha256>`` architecture is
    built from the operator-installed file under ``code_dirs`` (never from ``data``:
    safetensors hold tensors only), then given the weights of ``data`` by name.

    Raises
    ------
    WeightsError
        Not safetensors (a pickle is refused), no config, or tensor names, shapes or
        dtypes that do not match the config (the message lists them).
    """
    metadata = read_metadata(data)
    if config is None:
        if CONFIG_KEY not in metadata:
            raise WeightsError(f"safetensors metadata has no {CONFIG_KEY!r} and no config given")
        try:
            config = ModelConfig.from_json(metadata[CONFIG_KEY])
        except ModelConfigError as exc:
            raise WeightsError(f"embedded config is invalid: {exc}") from exc
    try:
        state = torch_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WeightsError(f"cannot read safetensors: {exc}") from exc
    try:
        model = build_network(config, code_dirs)
    except ModelConfigError as exc:
        raise WeightsError(f"model {config.name!r}: {exc}") from exc
    if isinstance(model, MultiHeadNetwork):
        # A pending added head has no trained weights anywhere yet: every node makes the
        # same ones from the config's seed (continual classes).
        state = {**state, **pending_init_state(model, config, state)}
    check_state(state, config, model=model)
    model.load_state_dict({k: _as_dtype(v, torch.float32) for k, v in state.items()},
                          strict=True)
    model.eval()
    return model, config


def code_dirs_for(path: Path) -> tuple[Path, ...]:
    """Where a model file's operator-installed TorchScript may live: ``torchscript/``
    beside it or one level up (``<models dir>/<name>/<version>.safetensors``)."""
    return (path.parent, path.parent.parent)


def save_model(model: SegmentationNetwork, config: ModelConfig, path: Path | str) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the safetensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model_to_bytes(model, config)
    write_atomic(path, data, durable=True, mode=SHARED_FILE)
    write_atomic(path.with_suffix(".json"), (config.to_json() + "\n").encode(), durable=True,
                 mode=SHARED_FILE)
    LOGGER.info("saved model %s generation %d to %s", config.name, config.generation, path)
    return path


def load_model(path: Path | str) -> tuple[SegmentationNetwork, ModelConfig]:
    """Load ``<stem>.safetensors``; a ``<stem>.json`` beside it must match the embedded config."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        path = path / "model.safetensors" if path.is_dir() else path.with_suffix(".safetensors")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    sidecar = path.with_suffix(".json")
    config = None
    if sidecar.exists():
        try:
            config = ModelConfig.from_json(sidecar.read_text())
        except ModelConfigError as exc:
            raise WeightsError(f"{sidecar}: {exc}") from exc
        embedded = read_metadata(data).get(CONFIG_KEY)
        if embedded is not None and ModelConfig.from_json(embedded) != config:
            raise WeightsError(f"{sidecar} does not match the config embedded in {path.name}")
    return model_from_bytes(data, config, code_dirs=code_dirs_for(path))


# -- validation --------------------------------------------------------------------------
def expected_shapes(
    config: ModelConfig, model: SegmentationNetwork | None = None
) -> dict[str, tuple]:
    model = model if model is not None else build_network(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(
    state: Mapping[str, torch.Tensor | np.ndarray],
    config: ModelConfig,
    *,
    model: SegmentationNetwork | None = None,
    partial: bool = False,
) -> None:
    """Check tensor names, shapes and dtypes against ``config``.

    ``partial`` allows a subset of names (a parameter-group update). An external
    network's integer buffers must keep the network's own dtype.
    """
    expected = expected_shapes(config, model)
    integer = ({k for k, v in model.state_dict().items() if v.dtype not in _FLOAT_DTYPES}
               if isinstance(model, ExternalNetwork) else set())
    problems: list[str] = []
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    missing = sorted(set(expected) - set(state))
    if missing and not partial:
        problems.append(f"missing tensors {_few(missing)}")
    for name, tensor in state.items():
        if name not in expected:
            continue
        shape = tuple(tensor.shape)
        if shape != expected[name]:
            problems.append(f"{name}: shape {shape}, config expects {expected[name]}")
        if name not in integer and not _is_float(tensor):
            problems.append(f"{name}: dtype {tensor.dtype} is not floating point")
    if problems:
        raise WeightsError(
            f"weights do not match model {config.name!r} generation {config.generation}: "
            + "; ".join(problems)
        )


def _is_float(tensor: torch.Tensor | np.ndarray) -> bool:
    if isinstance(tensor, torch.Tensor):
        return tensor.dtype in _FLOAT_DTYPES
    return bool(np.issubdtype(tensor.dtype, np.floating))


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# -- parameter groups --------------------------------------------------------------------
def group_of(name: str) -> str:
    """``encoder`` for ``encoder.*``, ``heads.X`` for ``heads.X.*``, ``network`` for an
    external network's ``network.*``."""
    parts = name.split(".")
    if parts[0] in ("encoder", NETWORK_HEAD):
        return parts[0]
    if parts[0] == "heads" and len(parts) > 2:
        return f"heads.{parts[1]}"
    raise WeightsError(f"tensor {name!r} belongs to no parameter group")


def extract_groups(
    model: SegmentationNetwork, groups: Iterable[str]
) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every tensor in the given groups, keyed by full name."""
    wanted = set(groups)
    known = ({NETWORK_HEAD} if isinstance(model, ExternalNetwork)
             else {"encoder", *(f"heads.{h}" for h in model.heads)})
    if wanted - known:
        raise WeightsError(f"unknown parameter groups {sorted(wanted - known)}")
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
        if group_of(name) in wanted
    }


def apply_groups(
    model: SegmentationNetwork, config: ModelConfig, arrays: Mapping[str, np.ndarray]
) -> set[str]:
    """Load received group tensors into ``model``; returns the groups touched.

    Every tensor of a touched group must be present (a group is replaced whole), with
    the right shape and finite values; otherwise nothing is changed.
    """
    check_state(arrays, config, model=model, partial=True)
    touched = {group_of(name) for name in arrays}
    state = model.state_dict()
    incomplete = [name for name in state if group_of(name) in touched and name not in arrays]
    if incomplete:
        raise WeightsError(f"incomplete parameter groups: missing {_few(sorted(incomplete))}")
    not_finite = sorted(k for k, v in arrays.items() if not np.all(np.isfinite(v)))
    if not_finite:
        raise WeightsError(f"non-finite values in {_few(not_finite)}")
    with torch.no_grad():
        for name, array in arrays.items():
            state[name].copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))
    return touched
