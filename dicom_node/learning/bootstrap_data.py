"""What a bootstrap trains on: a phantom generator and the model configuration that fits it.

Two sources ship with the node:

``ct``
    The synthetic abdomen (:mod:`dicom_node.phantom.ct`): the shipped starter
    ``tessera-abdomen-ct``.
``mr``
    Real head anatomy, Colin27 T1 + the AAL atlas read from Debian's ``mricron-data``
    at run time (:mod:`dicom_node.phantom.mr_atlas`): ``tessera-head-mr``. The AAL
    licence limits redistributing derived data, so its weights are never shipped;
    each node builds them (``tessera model bootstrap --data mr``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.learning.errors import LearningError
from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig, abdomen_ct_config
from dicom_node.learning.preprocessing_spec import Modality, Preprocessing
from dicom_node.phantom.subject import PhantomSubject

HEAD_MR_MODEL = "tessera-head-mr"


def head_mr_config(*, input_size: int = 128, generation: int = 0) -> ModelConfig:
    """The MR head model: the atlas label groups (values as ``mr_atlas.MR_LABELS``).

    The hemispheres share a head (their laterality is exclusive at every voxel, as the
    kidneys' in the CT model); cerebellum and deep grey matter have one each.
    """
    labels = (
        LabelSpec("cerebrum_left", 1, "372073000", "Cerebral hemisphere"),
        LabelSpec("cerebrum_right", 2, "372073000", "Cerebral hemisphere"),
        LabelSpec("cerebellum", 3, "113305005", "Cerebellum"),
        LabelSpec("deep_grey", 4, "389081007", "Gray Matter"),
    )
    heads = (HeadSpec("cerebrum", ("cerebrum_left", "cerebrum_right")),
             HeadSpec("cerebellum", ("cerebellum",)), HeadSpec("deep_grey", ("deep_grey",)))
    return ModelConfig(name=HEAD_MR_MODEL, generation=generation, labels=labels, heads=heads,
                       preprocessing=Preprocessing(modality=Modality.MR, input_size=input_size))


def _ct_subject(site: str, index: int, seed: int) -> PhantomSubject:
    from dicom_node.phantom.ct import generate_subject

    return generate_subject(site, index, seed)


def _mr_subject(site: str, index: int, seed: int) -> PhantomSubject:
    from dicom_node.phantom.mr_atlas import generate_subject

    return generate_subject(site, index, seed)


def _ct_sites() -> tuple[str, ...]:
    from dicom_node.phantom.ct import SITES

    return tuple(SITES)


def _mr_sites() -> tuple[str, ...]:
    from dicom_node.phantom.mr_atlas import SITES

    return tuple(SITES)


@dataclass(frozen=True)
class BootstrapData:
    """One phantom source: how to make subject ``index`` of ``(site, seed)`` and the
    configuration of the model trained on it."""

    name: str
    model_name: str
    config: Callable[[int], ModelConfig]  # input_size -> configuration
    subject: Callable[[str, int, int], PhantomSubject]
    sites: Callable[[], tuple[str, ...]]
    description: str

    def check_site(self, site: str) -> None:
        known = self.sites()
        if site not in known:
            raise LearningError(f"--data {self.name}: unknown phantom site {site!r}; "
                                f"known: {', '.join(known)}")


SOURCES: dict[str, BootstrapData] = {
    "ct": BootstrapData("ct", "tessera-abdomen-ct",
                        lambda size: abdomen_ct_config(input_size=size), _ct_subject,
                        _ct_sites, "synthetic abdomen CT (shipped starter)"),
    "mr": BootstrapData("mr", HEAD_MR_MODEL, lambda size: head_mr_config(input_size=size),
                        _mr_subject, _mr_sites,
                        "MR head, Colin27 + AAL from Debian mricron-data (built on site)"),
}


def source(name: str) -> BootstrapData:
    try:
        return SOURCES[name]
    except KeyError:
        raise LearningError(f"unknown bootstrap data {name!r}; known: "
                            f"{', '.join(SOURCES)}") from None
