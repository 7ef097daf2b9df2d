"""The partial-label tasks of ``partial_labels.py``: which data, which site annotates
which labels, the model they share, a site's slices (its labels drawn, nothing else),
and Dice per label running only the heads a model trained."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from subjects import Case, cached

from dicom_node.learning.inference import segment_volume
from dicom_node.learning.label_specs import AddedHead, HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig, abdomen_ct_config
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.preprocessing_spec import Modality, Preprocessing
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.slices import PreparedSlices, prepare_samples, samples_from_volume


@dataclass(frozen=True)
class Task:
    """Which data, which sites annotate which label, and the model they share."""

    name: str
    config: ModelConfig
    generate: Callable[[str, int, int], Case]
    site_labels: dict[str, tuple[str, ...]]  # training site -> the labels it annotates
    test_site: str


def ct_task(input_size: int) -> Task:
    from dicom_node.phantom.ct import generate_subject

    return Task("ct", abdomen_ct_config(input_size=input_size, name="partial-labels-ct"),
                cached("ct", generate_subject), {"A": ("liver",), "B": ("spleen",)}, "C")


def mr_config(input_size: int) -> ModelConfig:
    """The MR atlas's label groups as a model: one head per annotated structure."""
    from dicom_node.phantom.mr_atlas import MR_SEGMENTS

    labels = tuple(LabelSpec(s.name, s.label, s.property_type.value, s.property_type.meaning,
                             scheme=s.property_type.scheme_designator) for s in MR_SEGMENTS)
    heads = (HeadSpec("cerebrum", ("cerebrum_left", "cerebrum_right")),
             HeadSpec("cerebellum", ("cerebellum",)), HeadSpec("deep_grey", ("deep_grey",)))
    return ModelConfig(name="partial-labels-mr", generation=0, labels=labels, heads=heads,
                       preprocessing=Preprocessing(modality=Modality.MR, input_size=input_size))


def mr_task(input_size: int) -> Task:
    from dicom_node.phantom.mr_atlas import generate_subject

    return Task("mr", mr_config(input_size), cached("mr", generate_subject),
                {"A": ("cerebellum",), "B": ("cerebrum_left", "cerebrum_right")}, "C")


def site_slices(task: Task, site: str, subjects: int, seed: int,
                negatives: float) -> PreparedSlices:
    """What a site contributes: its labels drawn, nothing else.

    Slices showing its labels, plus ``negatives`` of the other slices with anatomy on
    them (its labels are known to be absent there). Every other structure is 0 in the
    label map, as a hospital annotating only those labels would save it.
    """
    config, names = task.config, task.site_labels[site]
    values = [config.label(n).value for n in names]
    rng = np.random.default_rng([seed, ord(site)])
    samples = []
    for index in range(subjects):
        image, labels, _ = task.generate(site, index, seed)
        mine = np.isin(labels, values)
        shown = mine.reshape(labels.shape[0], -1).any(axis=1)
        anatomy = labels.reshape(labels.shape[0], -1).any(axis=1)
        keep = [k for k in range(labels.shape[0])
                if shown[k] or (anatomy[k] and rng.random() < negatives)]
        drawn = np.where(mine, labels, 0).astype(np.uint8)
        samples += samples_from_volume(image, drawn, set(names), config, keep)
    return prepare_samples(samples, config)


def score(model: MultiHeadNetwork, config: ModelConfig, heads: Sequence[str],
          cases: Sequence[Case]) -> dict[str, float]:
    """Mean 3D Dice per label over ``cases``, running only ``heads`` (others pending)."""
    pending = tuple(AddedHead(h, 0) for h in config.head_names if h not in heads)
    run = replace(config, added_heads=pending)
    labels = {n: v for n, v in config.label_values.items()
              if config.head_of(n) in heads and not config.label(n).enclosing}
    per = [dice_per_label(segment_volume(model, run, image, spacing).labels, truth, labels)
           for image, truth, spacing in cases]
    return {n: float(np.mean([d[n] for d in per])) for n in labels}
