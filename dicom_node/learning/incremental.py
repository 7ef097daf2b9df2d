"""One round of incremental learning from corrections, as pure functions (no database).

Dafne's recipe: train a copy of the serving model for a few epochs on the slices the
radiologist touched, mixed with a replay buffer of earlier local slices (against
forgetting), then score base and candidate on held-out corrected slices. The node's
trainer job and ``benchmarks/learning.py`` both run these functions, so the benchmark
measures what the node does.

A sample is stored compactly as an ``.npz``: the touched slices plus neighbours (int16
intensities, uint8 labels), their indexes, the labels annotated and, for MR, the
volume's normalisation range (kept slices alone cannot reproduce it).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from dicom_node.learning.errors import TrainingError
from dicom_node.learning.inference import combine_heads, split_heads, stacked_softmax
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing import intensity_range, prepare_slices
from dicom_node.learning.slices import SliceSample
from dicom_node.learning.training import ProgressHook, TrainingReport, train
from dicom_node.learning.weights import arrays_to_bytes, extract_groups, model_from_bytes
from dicom_node.learning.weights import model_to_bytes as _model_to_bytes

LOGGER = logging.getLogger(__name__)

UPDATE_FORMAT = "tessera-update/1"


# -- what a correction changed ------------------------------------------------------------
def touched_slices(ai: np.ndarray, corrected: np.ndarray, values: Iterable[int]) -> list[int]:
    """Slices where the correction differs from the AI result on the labels it annotates.

    AI voxels of labels the correction does not annotate are not compared (a SEG that
    only holds the liver says nothing about the spleen).
    """
    if ai.shape != corrected.shape:
        raise ValueError(f"shapes differ: {ai.shape} vs {corrected.shape}")
    vals = np.asarray(sorted(set(values)), dtype=ai.dtype)
    projected = np.where(np.isin(ai, vals), ai, 0)
    differs = (projected != corrected).reshape(ai.shape[0], -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(differs)]


def with_neighbours(slices: Iterable[int], neighbours: int, depth: int) -> list[int]:
    """``slices`` widened by ``neighbours`` on each side, clipped to ``0..depth-1``."""
    keep: set[int] = set()
    for k in slices:
        keep.update(range(max(0, k - neighbours), min(depth, k + neighbours + 1)))
    return sorted(keep)


# -- stored samples -----------------------------------------------------------------------
@dataclass(frozen=True)
class StoredSample:
    """Slices of one corrected volume, as kept in a sample blob."""

    image: np.ndarray  # (n, rows, cols) int16 (HU for CT) or float32 (MR)
    labels: np.ndarray  # (n, rows, cols) uint8 label values
    slices: np.ndarray  # (n,) index of each slice in the source volume
    annotated: tuple[str, ...]
    mr_range: tuple[float, float] | None = None

    def slice_samples(self) -> list[SliceSample]:
        names = frozenset(self.annotated)
        return [
            SliceSample(self.image[i].astype(np.float32), self.labels[i], names, self.mr_range)
            for i in range(self.image.shape[0])
        ]


def cut_sample(
    volume: np.ndarray, labels: np.ndarray, slices: Sequence[int], annotated: Iterable[str],
    config: ModelConfig,
) -> StoredSample:
    """Keep ``slices`` of a volume and its corrected labels (intensity range from all)."""
    idx = np.asarray(sorted(slices), dtype=np.int32)
    mr_range = intensity_range(volume, config.preprocessing)
    image = volume[idx]
    if mr_range is None and np.all(np.abs(image) < 32767):
        image = np.rint(image).astype(np.int16)
    else:
        image = image.astype(np.float32)
    return StoredSample(image, labels[idx].astype(np.uint8), idx, tuple(sorted(annotated)),
                        mr_range)


def encode_sample(sample: StoredSample) -> bytes:
    meta = {"annotated": list(sample.annotated), "mr_range": sample.mr_range}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=sample.image, labels=sample.labels,
                        slices=sample.slices, meta=np.frombuffer(json.dumps(meta).encode(),
                                                                 dtype=np.uint8))
    return buffer.getvalue()


def decode_sample(data: bytes) -> StoredSample:
    """Inverse of :func:`encode_sample`; never unpickles (``allow_pickle=False``)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes().decode())
        rng = meta.get("mr_range")
        return StoredSample(npz["image"], npz["labels"], npz["slices"],
                            tuple(meta["annotated"]), tuple(rng) if rng else None)


# -- a round of training ------------------------------------------------------------------
def copy_model(model: MultiHeadNetwork, config: ModelConfig) -> MultiHeadNetwork:
    """An independent copy (through safetensors bytes, as everywhere else)."""
    copied, _ = model_from_bytes(_model_to_bytes(model, config), config)
    assert isinstance(copied, MultiHeadNetwork)  # the config names the multi-head U-Net
    return copied


def train_round(
    model: MultiHeadNetwork,
    config: ModelConfig,
    new: Sequence[SliceSample],
    replay: Sequence[SliceSample],
    policy: TrainingPolicy,
    *,
    anchors: Sequence[SliceSample] = (),
    progress: ProgressHook | None = None,
    optimiser_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[MultiHeadNetwork, TrainingReport]:
    """Train a copy of ``model`` on ``new`` plus ``replay`` (and rehearsal ``anchors``),
    continuing Adam from ``optimiser_state`` if given (see :func:`train`).

    The original is untouched.
    """
    candidate = copy_model(model, config)
    if not replay:
        policy = replace(policy, replay_fraction=0.0)
    if not anchors:
        policy = replace(policy, anchor_fraction=0.0)
    report = train(candidate, config, new, policy, replay=replay, anchors=anchors,
                   progress=progress, optimiser_state=optimiser_state)
    return candidate, report


Overlaps = dict[str, tuple[int, int]]  # label -> (|pred & truth|, |pred| + |truth|)


def evaluate_slices(
    model: SegmentationNetwork, config: ModelConfig, samples: Sequence[StoredSample],
    *, batch_size: int = 16,
) -> dict[str, float]:
    """Dice per annotated label pooled over the slices of ``samples``, plus ``mean``.

    Voxel counts are summed over every slice before the ratio, so small structures on
    a few slices do not dominate. Labels no sample annotates are left out. 2D networks
    only (a 3D network is scored on volumes: ``learning.evaluation.evaluate_samples``).
    """
    return pooled_dice(slice_overlaps(model, config, samples, batch_size=batch_size))


def pooled_dice(overlaps: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Dice per label from summed voxel counts (1.0 where both are empty), plus
    ``mean`` over the labels."""
    out = {name: (2.0 * inter / total if total else 1.0)
           for name, (inter, total) in overlaps.items()}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


def add_overlaps(into: Overlaps, pred: np.ndarray, truth: np.ndarray, config: ModelConfig,
                 annotated: Iterable[str]) -> None:
    """Add the voxel counts of ``annotated`` labels in one prediction to ``into``."""
    for name in annotated:
        value = config.label(name).value
        p, t = pred == value, truth == value
        inter, total = into.get(name, (0, 0))
        into[name] = (inter + int(np.logical_and(p, t).sum()),
                      total + int(p.sum()) + int(t.sum()))


def slice_overlaps(
    model: SegmentationNetwork, config: ModelConfig, samples: Sequence[StoredSample],
    *, batch_size: int = 16,
) -> Overlaps:
    """The voxel counts :func:`evaluate_slices` pools, per annotated label."""
    if config.spatial_dims != 2:
        raise TrainingError(f"model {config.name!r} is 3D: slice evaluation needs a 2D one")
    overlaps: Overlaps = {}
    pp = config.preprocessing
    heads = list(config.active_head_names)
    model.eval()
    with torch.inference_mode():
        for sample in samples:
            rows, cols = sample.image.shape[1:]
            for start in range(0, sample.image.shape[0], batch_size):
                x = prepare_slices(sample.image[start:start + batch_size], pp, sample.mr_range)
                logits = model(x, heads)
                stacked = torch.nn.functional.interpolate(
                    stacked_softmax(logits, heads), size=(rows, cols), mode="bilinear",
                    align_corners=False)
                probs = split_heads(stacked, heads, config)
                pred = combine_heads(probs, config)[0].numpy()
                add_overlaps(overlaps, pred, sample.labels[start:start + batch_size], config,
                             sample.annotated)
    return overlaps


def accept_candidate(
    base: Mapping[str, float] | None, candidate: Mapping[str, float] | None, margin: float
) -> tuple[bool, str]:
    """The gate: held-out mean Dice must not fall by more than ``margin``."""
    if not base or not candidate or "mean" not in base or "mean" not in candidate:
        return True, "no held-out corrected cases yet; accepted without evaluation"
    drop = base["mean"] - candidate["mean"]
    if drop > margin:
        return False, (f"held-out Dice fell by {drop:.4f} ({base['mean']:.4f} -> "
                       f"{candidate['mean']:.4f}), more than the margin {margin}")
    return True, f"held-out Dice {base['mean']:.4f} -> {candidate['mean']:.4f}"


# -- the update artifact ------------------------------------------------------------------
def trained_groups(report: TrainingReport, config: ModelConfig | None = None) -> list[str]:
    """The parameter groups a round changed: an external network's one group
    ``network``, else the encoder (unless frozen) and each trained head."""
    if config is not None and config.is_external:
        return list(config.parameter_groups())
    groups = [] if report.encoder_frozen else ["encoder"]
    return groups + [f"heads.{h}" for h in report.trained_heads]


def update_artifact(
    model: SegmentationNetwork, groups: Sequence[str], metadata: Mapping[str, object]
) -> tuple[bytes, dict[str, str]]:
    """Safetensors of the changed parameter groups, with the metadata as strings."""
    meta = {"format": UPDATE_FORMAT,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return arrays_to_bytes(extract_groups(model, groups), meta), meta
