"""Seeded phantom studies with ground truth: CT abdomen (synthetic) and MR head (atlas).

``generate_subject`` (CT) and ``mr_atlas.generate_subject`` (MR) return a
:class:`PhantomSubject`; :mod:`dicom_node.phantom.dicom` turns one into DICOM.
"""

from dicom_node.phantom.subject import PhantomSubject

__all__ = ["PhantomSubject"]
