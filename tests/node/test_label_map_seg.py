"""The SCP accepts Label Map Segmentation Storage (OHIF 3.12+'s save format) in the
uncompressed transfer syntaxes and RLE Lossless, and stores what it receives unchanged.
dcmtk 3.6.7 cannot send this SOP class, so the peer is a pynetdicom AE."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.seg_read import LABEL_MAP_SEGMENTATION_STORAGE
from dicom_node.store.models import Instance
from tests.corrections.helpers import Study, highdicom_seg
from tests.node.conftest import dataset_bytes, wait_until

SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless)


def test_label_map_seg_is_accepted_uncompressed_and_rle(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node()
    study = Study("B", 0, seed=7300, slices=4)
    seg = highdicom_seg(study.volume(), study.truth_in_volume_order(), CT_SEGMENTS,
                        "LABELMAP", RLELossless)
    sent = tmp_path / "seg.dcm"
    seg.save_as(sent, enforce_file_format=True)

    ae = AE(ae_title="VIEWER")
    for syntax in SYNTAXES:  # one presentation context each
        ae.add_requested_context(LABEL_MAP_SEGMENTATION_STORAGE, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == LABEL_MAP_SEGMENTATION_STORAGE}
        assert accepted == set(SYNTAXES)
        assert assoc.send_c_store(pydicom.dcmread(sent)).Status == 0x0000
    finally:
        assoc.release()

    def stored() -> Instance | None:
        with node.parts.db.session() as s:
            return s.query(Instance).filter_by(
                sop_instance_uid=str(seg.SOPInstanceUID)).one_or_none()

    row = wait_until(stored, what="the Label Map SEG indexed")
    assert row.sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE
    kept = node.parts.files.absolute(row.path)
    assert pydicom.dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID \
        == RLELossless
    assert dataset_bytes(kept) == dataset_bytes(sent)
