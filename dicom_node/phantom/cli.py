"""``tessera phantom``: write seeded phantom studies with ground truth as DICOM."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated

import typer

LOGGER = logging.getLogger(__name__)


class PlaneChoice(enum.StrEnum):
    axial = "axial"
    sagittal = "sagittal"
    coronal = "coronal"


class ModalityChoice(enum.StrEnum):
    CT = "CT"
    MR = "MR"


def phantom(
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    site: Annotated[str, typer.Option("--site", help="Site profile, e.g. A, B, C, D.")] = "A",
    subjects: Annotated[int, typer.Option("--subjects", min=1, help="Number of subjects.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed; same seed, same bytes.")] = 0,
    orientation: Annotated[
        PlaneChoice, typer.Option("--orientation", help="Acquisition plane.")
    ] = PlaneChoice.axial,
    modality: Annotated[
        ModalityChoice, typer.Option("--modality", help="CT abdomen or MR head (atlas).")
    ] = ModalityChoice.CT,
    first: Annotated[int, typer.Option("--first", min=0, help="Index of the first subject.")] = 0,
) -> None:
    """Write phantom studies: OUT/<site>-<index>/IMG*.dcm, gt-seg.dcm and labels.npy.

    CT: synthetic abdomen (body, liver, spleen, kidneys). MR: deformed Colin27 head
    with AAL label groups, read from Debian's mricron-data at run time.
    """
    from rich.progress import Progress

    from dicom_node.phantom.dicom import write_subject

    if modality is ModalityChoice.CT:
        from dicom_node.phantom.codes import CT_SEGMENTS as specs
        from dicom_node.phantom.ct import SITES, generate_subject

        if site not in SITES:
            raise typer.BadParameter(f"unknown site {site!r}; known: {', '.join(SITES)}")
    else:
        from dicom_node.phantom.mr_atlas import MR_SEGMENTS as specs
        from dicom_node.phantom.mr_atlas import SITES as MR_SITES
        from dicom_node.phantom.mr_atlas import generate_subject  # type: ignore[assignment]

        if site not in MR_SITES:
            raise typer.BadParameter(f"unknown site {site!r}; known: {', '.join(MR_SITES)}")

    out.mkdir(parents=True, exist_ok=True)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"phantom {modality.value} site {site}", total=subjects)
        for index in range(first, first + subjects):
            subject = generate_subject(site, index, seed, orientation=orientation.value)
            folder = write_subject(subject, out, specs)
            progress.advance(task)
            typer.echo(f"{folder}  {subject.image.shape[0]} slices  {subject.spacing}")
