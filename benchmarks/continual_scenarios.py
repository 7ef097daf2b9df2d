"""The continual-classes experiments of ``continual.py``: what the starter knows, which
head is added, where the old and new sites' data come from (CT phantom or MR atlas)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.preprocessing_spec import Modality, Preprocessing
from dicom_node.phantom.subject import PhantomSubject
from federation_grpc.hub.heads import NewHead, NewLabel


@dataclass(frozen=True)
class Scenario:
    """What the starter knows, what is added, and where the data comes from."""

    name: str
    labels: tuple[LabelSpec, ...]
    heads: tuple[HeadSpec, ...]
    new_head: NewHead
    old_eval: tuple[str, ...]  # labels scored on the old site
    generate: Callable[[str, int, int], PhantomSubject]
    old_site: str
    new_site: str
    modality: Modality
    new_head_epochs: int  # default of --kidney-epochs

    def config(self, input_size: int) -> ModelConfig:
        return ModelConfig(f"continual-{self.name}", 0, self.labels, self.heads,
                           preprocessing=Preprocessing(modality=self.modality,
                                                       input_size=input_size))

    @property
    def new_labels(self) -> tuple[str, ...]:
        return tuple(lab.name for lab in self.new_head.labels)


def ct_scenario() -> Scenario:
    from dicom_node.phantom.ct import generate_subject

    return Scenario(
        name="ct",
        labels=(LabelSpec("body", 1, "38266002", "Entire body", enclosing=True),
                LabelSpec("liver", 2, "10200004", "Liver"),
                LabelSpec("spleen", 3, "78961009", "Spleen")),
        heads=(HeadSpec("body", ("body",)), HeadSpec("liver", ("liver",)),
               HeadSpec("spleen", ("spleen",))),
        new_head=NewHead("kidneys", (NewLabel("kidney_left", 4, "18639004", "Left kidney"),
                                     NewLabel("kidney_right", 5, "9846003", "Right kidney"))),
        old_eval=("body", "liver", "spleen"),
        generate=lambda site, i, seed: generate_subject(site, i, seed),
        old_site="A", new_site="B", modality=Modality.CT, new_head_epochs=80,
    )


def mr_scenario() -> Scenario:
    from dicom_node.phantom import mr_atlas

    mr_atlas.load_atlas()  # AtlasNotInstalled names the Debian package to install
    seg = {s.label: s for s in mr_atlas.MR_SEGMENTS}

    def spec(value: int) -> LabelSpec:
        s = seg[value]
        return LabelSpec(s.name, value, s.property_type.value, s.property_type.meaning)

    grey = seg[mr_atlas.DEEP_GREY].property_type
    return Scenario(
        name="mr",
        labels=(spec(mr_atlas.CEREBRUM_LEFT), spec(mr_atlas.CEREBRUM_RIGHT),
                spec(mr_atlas.CEREBELLUM)),
        heads=(HeadSpec("cerebrum", ("cerebrum_left", "cerebrum_right")),
               HeadSpec("cerebellum", ("cerebellum",))),
        new_head=NewHead("deep_grey", (NewLabel("deep_grey", mr_atlas.DEEP_GREY, grey.value,
                                                "Deep grey matter"),)),
        old_eval=("cerebrum_left", "cerebrum_right", "cerebellum"),
        generate=lambda site, i, seed: mr_atlas.generate_subject(site, i, seed),
        old_site="A", new_site="B", modality=Modality.MR,
        new_head_epochs=400,  # only ~100 deep_grey slices; 80 epochs gave 92.2% of joint
    )
