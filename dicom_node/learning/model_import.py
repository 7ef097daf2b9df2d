"""``tessera model import``: a MONAI bundle or a TorchScript file becomes a Tessera model.

Either way the result is the node's own format, ``<out>/<name>/model.safetensors`` plus
``model.json`` (:mod:`dicom_node.learning.weights`), and nothing is written unless every
check passed.

MONAI bundle (a directory):
  - ``configs/inference.json`` (or ``.yaml``) gives ``network_def``: its ``_target_`` must
    name a class of ``monai.networks.nets`` in the allowlist
    (:data:`~dicom_node.learning.external.MONAI_NETWORKS`); nothing else is imported.
    Arguments may refer to top-level values (``"@num_classes"``); ``$`` expressions are
    code and are refused. The ``preprocessing`` transforms ``Orientationd`` (RAS),
    ``Spacingd``, ``ScaleIntensityRanged``, ``NormalizeIntensityd`` and the
    ``SlidingWindowInferer`` give the model's preprocessing and window;
  - ``models/model.pt`` is a state dict read with ``torch.load(weights_only=True)``,
    which refuses a pickle carrying code;
  - ``configs/metadata.json`` gives the labels
    (``network_data_format.outputs.pred.channel_def``), mapped to SNOMED CT codes through
    :mod:`dicom_node.pipeline.label_codings`; an unknown label needs ``--labels``.

TorchScript file plus a JSON description (``--labels``): TorchScript is code, so the
file is installed on this node only, as ``<out>/torchscript/<sha256>.pt``, and the model
config names it ``torchscript:<sha256>``; the safetensors hold its ``state_dict`` (what
the hub federates, by parameter name). The description::

    {"modality": "MR", "spatial_dims": 3, "in_channels": 1, "output": "probabilities",
     "labels": {"1": "brain"},
     "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                       "intensity": [{"op": "percentiles", "lower": 0.5, "upper": 99.5}],
                       "roi_size": [128, 128, 128], "overlap": 0.25}}

A label is a name from the label table or ``{"name", "code", "meaning", "scheme"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dicom_node.learning.errors import LearningError
from dicom_node.learning.external import (
    MONAI_NETWORKS,
    MONAI_PREFIX,
    TORCHSCRIPT_DIR,
    TORCHSCRIPT_PREFIX,
    ExternalNetwork,
    NetworkOutput,
    NetworkSpec,
    build_external,
    sha256_file,
)
from dicom_node.learning.label_specs import LabelSpec
from dicom_node.learning.model_config import ModelConfig, external_config
from dicom_node.learning.preprocessing_spec import (
    IntensityStep,
    Modality,
    Preprocessing,
    VolumePreprocessing,
)
from dicom_node.learning.weights import save_model
from dicom_node.pipeline.label_codings import coding_for
from dicom_node.store.durable import SHARED_FILE, write_atomic

LOGGER = logging.getLogger(__name__)

_MONAI_NETS = "monai.networks.nets."
_REF = re.compile(r"^@([A-Za-z_][A-Za-z0-9_]*)$")


class ModelImportError(LearningError):
    """The bundle or TorchScript file cannot become a model; nothing was written."""


@dataclass(frozen=True)
class ImportedModel:
    config: ModelConfig
    path: Path
    torchscript: Path | None = None


# -- labels ------------------------------------------------------------------------------
def resolve_labels(channels: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                   out_channels: int) -> list[LabelSpec]:
    """Channel index -> label text (channel 0 is background) -> coded :class:`LabelSpec`."""
    try:
        indexed = {int(k): v for k, v in channels.items()}
    except (TypeError, ValueError) as exc:
        raise ModelImportError(f"labels: channel indexes must be integers ({exc})") from exc
    indexed.pop(0, None)  # background
    if sorted(indexed) != list(range(1, out_channels)):
        raise ModelImportError(
            f"labels: the network has {out_channels} output channels, so labels for channels "
            f"1..{out_channels - 1} are needed; got channels {sorted(indexed)}")
    specs = []
    for index in range(1, out_channels):
        entry = (overrides or {}).get(str(index), indexed[index])
        specs.append(_label_spec(index, entry))
    return specs


def _label_spec(index: int, entry: Any) -> LabelSpec:
    if isinstance(entry, Mapping):
        try:
            return LabelSpec(name=str(entry["name"]), value=index, code=str(entry["code"]),
                             meaning=str(entry["meaning"]),
                             scheme=str(entry.get("scheme", "SCT")))
        except KeyError as exc:
            raise ModelImportError(f"labels.{index}: missing {exc.args[0]!r}") from exc
        except LearningError as exc:
            raise ModelImportError(f"labels.{index}: {exc}") from exc
    found = coding_for(str(entry))
    if found is None:
        raise ModelImportError(
            f"labels.{index}: {str(entry)[:64]!r} is not in the label table; give its "
            'coding with --labels {"' f'{index}' '": {"name", "code", "meaning"}}')
    name, code = found
    return LabelSpec(name=name, value=index, code=code.value, meaning=code.meaning,
                     scheme=code.scheme_designator)


# -- MONAI bundle ------------------------------------------------------------------------
def _read_config(configs: Path) -> dict[str, Any]:
    for candidate in ("inference.json", "inference.yaml", "inference.yml"):
        path = configs / candidate
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import yaml  # PyYAML: only YAML bundles need it
            except ImportError as exc:
                raise ModelImportError(f"{path.name}: reading YAML needs PyYAML") from exc
            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ModelImportError(f"{path}: not an object")
        return data
    raise ModelImportError(f"{configs}: no inference.json or inference.yaml")


def _resolve(value: Any, top: Mapping[str, Any], depth: int = 0) -> Any:
    """Plain JSON with ``@name`` references to top-level values; ``$`` code is refused."""
    if depth > 16:
        raise ModelImportError("network_def: references nest too deep")
    if isinstance(value, str):
        if value.startswith("$"):
            raise ModelImportError(f"network_def: expression {value[:48]!r} is code; refused")
        ref = _REF.match(value)
        if ref:
            if ref.group(1) not in top:
                raise ModelImportError(f"network_def: unknown reference {value[:48]!r}")
            return _resolve(top[ref.group(1)], top, depth + 1)
        return value
    if isinstance(value, list):
        return [_resolve(v, top, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth + 1) for k, v in value.items()}
    return value


def monai_network(network_def: Any, top: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(class name, arguments)`` of a bundle's ``network_def``, from the allowlist only."""
    if not isinstance(network_def, Mapping) or not isinstance(network_def.get("_target_"), str):
        raise ModelImportError("network_def: an object with a '_target_' is required")
    target = network_def["_target_"]
    name = target.rsplit(".", 1)[-1]
    module = target[: -len(name)]
    if module and not (module == _MONAI_NETS or (module.startswith(_MONAI_NETS)
                                                  and module.count(".") == 4)):
        raise ModelImportError(f"network_def._target_ {target[:80]!r}: only classes of "
                               "monai.networks.nets are imported")
    if name not in MONAI_NETWORKS:
        raise ModelImportError(f"network_def._target_ {target[:80]!r} is not an allowed MONAI "
                               f"network (allowed: {sorted(MONAI_NETWORKS)})")
    args = {k: _resolve(v, top) for k, v in network_def.items() if not k.startswith("_")}
    if "dimensions" in args and "spatial_dims" not in args:  # older MONAI argument name
        args["spatial_dims"] = args.pop("dimensions")
    return name, args


def _bundle_preprocessing(config: Mapping[str, Any], modality: Modality) -> Preprocessing:
    """Geometry, intensity and window from the bundle's transforms (by name, no code)."""
    pre = config.get("preprocessing")
    transforms = pre.get("transforms", []) if isinstance(pre, Mapping) else []
    orientation, spacing, steps = None, None, []
    for t in transforms if isinstance(transforms, list) else []:
        if not isinstance(t, Mapping):
            continue
        kind = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        t = _resolve({k: v for k, v in t.items() if k in (
            "axcodes", "pixdim", "a_min", "a_max", "b_min", "b_max", "nonzero")}, config)
        if kind in ("Orientationd", "Orientation"):
            if str(t.get("axcodes", "RAS")).upper() != "RAS":
                raise ModelImportError(f"preprocessing: orientation {t.get('axcodes')!r}: "
                                       "only RAS is supported")
            orientation = "RAS"
        elif kind in ("Spacingd", "Spacing"):
            spacing = tuple(float(v) for v in t["pixdim"])
        elif kind in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            b_min, b_max = float(t.get("b_min", 0.0)), float(t.get("b_max", 1.0))
            steps += [IntensityStep("window", float(t["a_min"]), float(t["a_max"])),
                      IntensityStep("affine", scale=(b_max - b_min) / 2,
                                    offset=(b_max + b_min) / 2)]
        elif kind in ("NormalizeIntensityd", "NormalizeIntensity"):
            steps.append(IntensityStep("zscore"))
    inferer = config.get("inferer") if isinstance(config.get("inferer"), Mapping) else {}
    inf = _resolve({k: v for k, v in inferer.items() if k in (  # type: ignore[union-attr]
        "roi_size", "sw_batch_size", "overlap")}, config)
    volume = VolumePreprocessing(
        orientation=orientation, spacing=spacing, intensity=tuple(steps),  # type: ignore[arg-type]
        roi_size=tuple(int(v) for v in inf.get("roi_size", (96, 96, 96))),  # type: ignore[arg-type]
        sw_batch_size=min(int(inf.get("sw_batch_size", 1)), 4),  # bounded on CPU
        overlap=float(inf.get("overlap", 0.25)))
    return Preprocessing(modality=modality, volume=volume)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, read with ``weights_only=True`` only (invariant 4)."""
    if not path.is_file():
        raise ModelImportError(f"{path}: no weights (a bundle needs models/model.pt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"{path.name}: refused, not a plain state dict "
                               f"(torch.load weights_only: {first})") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ModelImportError(f"{path.name}: not a state dict of named tensors")
    return dict(data)


def import_bundle(bundle: Path, out: Path, *, name: str | None = None,
                  labels: Mapping[str, Any] | None = None) -> ImportedModel:
    """A MONAI bundle directory -> ``<out>/<name>/model.safetensors`` (see module doc)."""
    bundle = Path(bundle)
    config = _read_config(bundle / "configs")
    try:
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{bundle}: configs/metadata.json unreadable: {exc}") from exc
    cls, args = monai_network(config.get("network_def"), config)
    fmt = metadata.get("network_data_format", {}) if isinstance(metadata, Mapping) else {}
    channels = (fmt.get("outputs", {}).get("pred", {}).get("channel_def") or {})
    stated = str(fmt.get("inputs", {}).get("image", {}).get("modality", "CT")).upper()
    modality = Modality.MR if stated in ("MR", "MRI") else Modality.CT
    spec = _network_spec(args, NetworkOutput.LOGITS)
    label_specs = resolve_labels(channels or labels or {}, labels, spec.out_channels)
    model_name = name or _slug(str(metadata.get("name") or bundle.name))
    mconfig = _config(model_name, MONAI_PREFIX + cls, spec, label_specs,
                      _bundle_preprocessing(config, modality))
    state = load_state_dict_file(bundle / "models" / "model.pt")
    model = build_external(mconfig.architecture, spec)
    _load(model, state, bundle / "models" / "model.pt")
    path = save_model(model, mconfig, Path(out) / model_name / "model.safetensors")
    LOGGER.info("imported MONAI bundle %s as %s (%s)", bundle.name, model_name, cls)
    return ImportedModel(mconfig, path)


# -- TorchScript -------------------------------------------------------------------------
def import_torchscript(script: Path, description: Mapping[str, Any], out: Path, *,
                       name: str | None = None) -> ImportedModel:
    """A TorchScript file plus its JSON description -> an installed local module and a
    ``torchscript:<sha256>`` model (see module doc)."""
    script = Path(script)
    if not script.is_file():
        raise ModelImportError(f"{script}: no such file")
    sha = sha256_file(script)
    try:
        # The operator's own local file (this is the install step); never hub bytes.
        scripted = torch.jit.load(str(script), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelImportError(f"{script.name}: not a TorchScript module "
                               f"({str(exc).strip()[:160]})") from exc
    args = {k: description.get(k) for k in ("spatial_dims", "in_channels")}
    if args["spatial_dims"] not in (2, 3) or not isinstance(args["in_channels"], int):
        raise ModelImportError("description: spatial_dims (2 or 3) and in_channels are required")
    try:
        output = NetworkOutput(str(description.get("output", "logits")))
    except ValueError as exc:
        raise ModelImportError(f"description.output: {exc}") from exc
    # One small forward pass tells the output channels the labels must match.
    probe = torch.zeros(1, args["in_channels"], *([32] * args["spatial_dims"]))
    try:
        with torch.inference_mode():
            out_ch = int(scripted.eval()(probe).shape[1])
    except (RuntimeError, IndexError, AttributeError) as exc:
        raise ModelImportError(f"{script.name}: a {args['spatial_dims']}D input of "
                               f"{args['in_channels']} channel(s) fails: "
                               f"{str(exc).strip()[:160]}") from exc
    spec = _network_spec({**args, "out_channels": out_ch}, output)
    label_specs = resolve_labels(description.get("labels") or {}, None, out_ch)
    pre = description.get("preprocessing") or {}
    try:
        modality = Modality(str(description.get("modality", "CT")))
        pp = (Preprocessing(modality=modality, volume=VolumePreprocessing.from_dict(pre))
              if spec.spatial_dims == 3 else
              Preprocessing(modality=modality, input_size=int(pre.get("input_size", 128))))
    except (LearningError, TypeError, ValueError, KeyError) as exc:
        raise ModelImportError(f"preprocessing: {exc}") from exc
    model_name = name or _slug(script.stem)
    mconfig = _config(model_name, TORCHSCRIPT_PREFIX + sha, spec, label_specs, pp)
    model = ExternalNetwork(scripted, spec)
    installed = Path(out) / TORCHSCRIPT_DIR / f"{sha}.pt"
    installed.parent.mkdir(parents=True, exist_ok=True)
    code = script.read_bytes()  # what is installed is exactly what was hashed and loaded
    if hashlib.sha256(code).hexdigest() != sha:
        raise ModelImportError(f"{script}: changed while it was copied; nothing installed")
    write_atomic(installed, code, durable=True, mode=SHARED_FILE)
    path = save_model(model, mconfig, Path(out) / model_name / "model.safetensors")
    LOGGER.info("imported TorchScript %s as %s (torchscript:%s)", script.name, model_name, sha)
    return ImportedModel(mconfig, path, installed)


# -- shared ------------------------------------------------------------------------------
def _network_spec(args: Mapping[str, Any], output: NetworkOutput) -> NetworkSpec:
    try:
        return NetworkSpec(args=dict(args), output=output)
    except LearningError as exc:
        raise ModelImportError(str(exc)) from exc


def _config(name: str, architecture: str, spec: NetworkSpec, labels: list[LabelSpec],
            pp: Preprocessing) -> ModelConfig:
    try:
        return external_config(name, architecture, spec, labels, pp)
    except LearningError as exc:
        raise ModelImportError(str(exc)) from exc


def _load(model: ExternalNetwork, state: Mapping[str, torch.Tensor], source: Path) -> None:
    prefixed = {f"network.{k.removeprefix('module.')}": v for k, v in state.items()}
    try:
        result = model.load_state_dict(prefixed, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise ModelImportError(f"{source.name} does not fit network_def: "
                               f"{str(exc).strip()[:300]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelImportError(
            f"{source.name} does not fit network_def: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}")


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return slug[:64] or "imported-model"
