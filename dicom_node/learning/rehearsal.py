"""Rehearsal anchors: slices like the data the model came from, made on the node.

Why: a node only holds its own corrections. When its scanner renders organs with
another contrast than the data the model learned from, a round of training re-maps
the decoder heads to the local intensities, and nothing in the batch (new slices,
replay of earlier local slices, distillation on those same slices) says what the
heads should still do on the old intensities; held-out data of the model's origin
falls (``benchmarks/learning.py``: -0.15 Dice in 10 rounds, kidneys and spleen most).

The starter model is bootstrapped from the phantom generator the node ships
(``tessera model bootstrap``, site A), so the node can make more of that data
locally, with exact labels, without patient data or a download: a few subjects of
the phantom site of the model's origin, every slice that shows a non-enclosing
label and every ``BODY_STRIDE``-th of the others. Training draws
``TrainingPolicy.anchor_fraction`` of each batch from them, and
:class:`AnchorGate` refuses a round whose candidate scores worse on them than the
round's base model by more than a margin (a round that forgets is not served).

CT models take :func:`dicom_node.phantom.ct.generate_subject`; MR models the MR
atlas (:func:`dicom_node.phantom.mr_atlas.generate_subject`). Phantom labels map to
model labels by name; model labels the phantom lacks are left unannotated.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.learning.errors import TrainingError
from dicom_node.learning.incremental import StoredSample, accept_candidate, evaluate_slices
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.policy import RehearsalPlan
from dicom_node.learning.preprocessing import intensity_range
from dicom_node.learning.preprocessing_spec import Modality, Preprocessing
from dicom_node.learning.slices import SliceSample

LOGGER = logging.getLogger(__name__)

BODY_STRIDE = 4  # of the slices without a non-enclosing label, keep every 4th
MR_SITES = ("A", "B", "C")


def anchor_set(config: ModelConfig, plan: RehearsalPlan) -> tuple[StoredSample, ...]:
    """The anchors for ``config``'s labels and modality (cached per process); ``()`` if off.

    Same plan and labels give the same slices (the phantom generator is seeded).

    Raises
    ------
    TrainingError
        The site does not exist for the model's modality, or the phantom has none of
        the model's labels.
    """
    if not plan.enabled:
        return ()
    labels = tuple((lab.name, lab.value, lab.enclosing) for lab in config.labels)
    return _anchor_set(config.preprocessing, labels, plan.site, plan.subjects, plan.seed)


def anchor_slices(anchors: Sequence[StoredSample]) -> list[SliceSample]:
    return [x for sample in anchors for x in sample.slice_samples()]


class AnchorGate:
    """Refuses a round that forgets: anchor Dice of the candidate vs the round's base.

    Scores a fixed subset of the anchors (every ``stride``-th slice: scoring all of
    them would cost as much as the training round) and remembers each model's score
    while the model object lives, so that the base of the next round, the candidate
    served now, is not scored twice.
    """

    def __init__(self, anchors: Sequence[StoredSample], margin: float, stride: int = 8) -> None:
        if stride < 1:
            raise TrainingError(f"stride must be >= 1, got {stride}")
        self.margin = margin
        self.slices = tuple(
            StoredSample(a.image[::stride], a.labels[::stride], a.slices[::stride],
                         a.annotated, a.mr_range)
            for a in anchors
        )
        self._scores: weakref.WeakKeyDictionary[MultiHeadNetwork, dict[str, float]] = (
            weakref.WeakKeyDictionary())

    def score(self, model: MultiHeadNetwork, config: ModelConfig) -> dict[str, float]:
        if model not in self._scores:
            self._scores[model] = evaluate_slices(model, config, self.slices)
        return self._scores[model]

    def check(
        self, base: MultiHeadNetwork, base_config: ModelConfig,
        candidate: MultiHeadNetwork, candidate_config: ModelConfig,
    ) -> AnchorCheck:
        before = self.score(base, base_config)
        after = self.score(candidate, candidate_config)
        ok, why = accept_candidate(before, after, self.margin)
        return AnchorCheck(ok, "anchors: " + why.replace("held-out ", ""), before, after)


@dataclass(frozen=True)
class AnchorCheck:
    accepted: bool
    verdict: str
    base: dict[str, float]
    candidate: dict[str, float]


@functools.lru_cache(maxsize=4)
def _anchor_set(
    pp: Preprocessing,
    labels: tuple[tuple[str, int, bool], ...],
    site: str,
    subjects: int,
    seed: int,
) -> tuple[StoredSample, ...]:
    generate = _generator(pp.modality, site)
    out = []
    for index in range(subjects):
        subject = generate(site, index, seed)
        mapped, annotated = _map_labels(subject.labels, subject.label_names, labels)
        if not annotated:
            raise TrainingError(f"phantom site {site} has none of the model's labels "
                                f"{[n for n, _, _ in labels]}")
        organs = np.isin(mapped, [v for n, v, enc in labels if not enc and n in annotated])
        has_organ = organs.reshape(mapped.shape[0], -1).any(axis=1)
        others = np.flatnonzero(~has_organ)[::BODY_STRIDE]
        keep = sorted({int(k) for k in np.flatnonzero(has_organ)} | {int(k) for k in others})
        idx = np.asarray(keep, dtype=np.int32)
        mr_range = intensity_range(subject.image, pp)  # of the whole volume, as cut_sample
        image = subject.image[idx]
        image = image.astype(np.int16 if mr_range is None else np.float32)
        out.append(StoredSample(image, mapped[idx], idx, annotated, mr_range))
    LOGGER.info("rehearsal anchors: %d slices of %d %s subjects of phantom site %s",
                sum(s.image.shape[0] for s in out), subjects, pp.modality.value, site)
    return tuple(out)


def _generator(modality: Modality, site: str):  # type: ignore[no-untyped-def]
    if modality is Modality.CT:
        from dicom_node.phantom.ct import generate_subject
        return generate_subject
    if site not in MR_SITES:
        raise TrainingError(f"MR rehearsal site must be one of {', '.join(MR_SITES)}, "
                            f"got {site!r}")
    from dicom_node.phantom.mr_atlas import generate_subject as generate_mr
    return generate_mr


def _map_labels(
    values: np.ndarray, names: Mapping[int, str], labels: tuple[tuple[str, int, bool], ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    model = {name: value for name, value, _ in labels}
    # a phantom structure the model lacks lies inside the phantom's body: it belongs to
    # the model's enclosing label where there is one (whose target is every labelled voxel)
    inside = next((v for n, v, enc in labels if enc and n in names.values()), 0)
    lut = np.zeros(max(max(names), 0) + 1, np.uint8)
    annotated = []
    for phantom_value, name in names.items():
        if name in model:
            lut[phantom_value] = model[name]
            annotated.append(name)
        elif phantom_value != 0:
            lut[phantom_value] = inside
    return lut[values], tuple(sorted(annotated))
