"""QIDO-RS (PS3.18 10.6): studies, series and instances, matching keys, paging, includefield.

UIDs, StudyDate and Modality are matched in the index; other keys (PatientName,
PatientID, AccessionNumber, ...) against the header of one instance per study or
series (see :mod:`viewer_bridge.headers`). String keys take ``*`` and ``?``
wildcards; PersonName matches case-insensitively; dates take ranges ``A-B``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from viewer_bridge.errors import BridgeError
from viewer_bridge.headers import HeaderCache
from viewer_bridge.index import BridgeIndex, InstanceRef, SeriesRow, StudyRow, valid_uid

LOGGER = logging.getLogger(__name__)

MAX_LIMIT = 1000
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching", "_"}
_UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


STUDY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
              "ModalitiesInStudy", "ReferringPhysicianName", "PatientName", "PatientID",
              "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDescription", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
               "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime",
               "BodyPartExamined", "PerformedProcedureStepStartDate", "StudyInstanceUID")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber",
                 "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
                 "StudyInstanceUID", "SeriesInstanceUID")
_COMPUTED = {"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
             "NumberOfSeriesRelatedInstances", "InstanceAvailability"}


class QueryError(BridgeError, ValueError):
    """A query parameter is invalid (answered 400 with this message)."""


@dataclass
class Query:
    filters: dict[str, str] = field(default_factory=dict)   # keyword -> value
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = MAX_LIMIT
    offset: int = 0


def _keyword(name: str) -> str:
    """A keyword from ``PatientName`` or ``00100010``; raises QueryError."""
    name = name.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise QueryError(f"unknown attribute {name[:64]!r}")


def _non_negative(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be a non-negative integer, not {raw[:20]!r}") from None
    if value < 0:
        raise QueryError(f"{name} must be a non-negative integer, not {raw[:20]!r}")
    return value


def parse_query(items: Iterable[tuple[str, str]]) -> Query:
    """Build a :class:`Query` from URL parameters (repeated keys allowed)."""
    query = Query()
    for name, value in items:
        key = name.strip()
        if key == "limit":
            query.limit = min(_non_negative("limit", value), MAX_LIMIT)
        elif key == "offset":
            query.offset = _non_negative("offset", value)
        elif key == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item.lower() == "all":
                    query.include_all = True
                elif item:
                    query.include.add(_keyword(item))
        elif key in _CONTROL:
            continue
        else:
            keyword = _keyword(key.split(".")[0])
            if keyword in _UID_KEYS:
                for uid in re.split(r"[,\\]", value):
                    if uid.strip():
                        valid_uid(uid.strip(), keyword)
            query.filters[keyword] = value
    return query


def _values(ds: Dataset, keyword: str) -> list[str]:
    elem = ds.data_element(keyword) if keyword in ds else None
    if elem is None or elem.value is None or elem.value == "":
        return []
    value = elem.value
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    return [str(v) for v in items]


def value_matches(values: Sequence[str], wanted: str, keyword: str) -> bool:
    """PS3.4 C.2.2.2 matching of one key against the values an object has."""
    wanted = wanted.strip()
    if not wanted or wanted == "*":
        return True
    vr = dictionary_VR(keyword)
    candidates = [w.strip() for w in re.split(r"[,\\]", wanted)] if vr in ("UI", "CS") \
        else [wanted]
    for have in values:
        have = have.strip()
        for want in candidates:
            if vr in ("DA", "TM", "DT") and "-" in want:
                low, _, high = want.partition("-")
                if (not low or have >= low) and (not high or have[:len(high)] <= high):
                    return True
            elif "*" in want or "?" in want:
                pattern = fnmatch.translate(want.replace("[", "[[]"))
                flags = re.IGNORECASE if vr == "PN" else 0
                if re.match(pattern, have, flags):
                    return True
            elif (have.lower() == want.lower()) if vr == "PN" else have == want:
                return True
    return False


def _matches(ds: Dataset, filters: dict[str, str], skip: set[str]) -> bool:
    return all(value_matches(_values(ds, k), v, k) for k, v in filters.items() if k not in skip)


def _element_json(ds: Dataset, keyword: str) -> dict[str, Any] | None:
    if keyword in ds:
        elem = ds.data_element(keyword)
        if elem is not None:
            return elem.to_json_dict(None, 1024 * 1024)
    return None


def _to_json(ds: Dataset | None, keys: Iterable[str], query: Query,
             computed: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = set(keys) | query.include | set(query.filters)
    if query.include_all and ds is not None:
        for elem in ds:
            if elem.tag.group > 0x0002 and elem.VR != "SQ" and elem.tag != 0x7FE00010:
                out[f"{elem.tag:08X}"] = elem.to_json_dict(None, 1024 * 1024)
    for keyword in wanted:
        tag = f"{tag_for_keyword(keyword):08X}"
        if keyword in computed:
            vr, value = computed[keyword]
            out[tag] = {"vr": vr, "Value": value} if value else {"vr": vr}
            continue
        item = _element_json(ds, keyword) if ds is not None else None
        out[tag] = item if item is not None else {"vr": dictionary_VR(keyword)}
    return dict(sorted(out.items()))


def _page(rows: list[Any], query: Query) -> list[Any]:
    return rows[query.offset:query.offset + query.limit]


def _uids(query: Query, keyword: str) -> list[str]:
    raw = query.filters.get(keyword, "")
    return [u.strip() for u in re.split(r"[,\\]", raw) if u.strip()]


class QidoService:
    """Answers QIDO-RS searches as lists of DICOM JSON objects."""

    def __init__(self, index: BridgeIndex, headers: HeaderCache) -> None:
        self.index = index
        self.headers = headers

    def _header(self, path: Any) -> Dataset | None:
        if path is None:
            return None
        try:
            return self.headers.get(path)
        except Exception:
            LOGGER.exception("cannot read the header of %s", path.name)
            return None

    def studies(self, query: Query) -> list[dict[str, Any]]:
        rows: list[StudyRow] = self.index.studies(_uids(query, "StudyInstanceUID"))
        date = query.filters.get("StudyDate")
        if date:
            rows = [r for r in rows if value_matches([r.study_date or ""], date, "StudyDate")]
        mods = query.filters.get("ModalitiesInStudy") or query.filters.get("Modality")
        if mods:
            rows = [r for r in rows if value_matches(r.modalities, mods, "ModalitiesInStudy")]
        skip = {"StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "Modality"}
        out = []
        for row in rows:
            ds = self._header(row.first_instance)
            if ds is None or not _matches(ds, query.filters, skip):
                continue
            out.append((row, ds))
        return [_to_json(ds, STUDY_KEYS, query, {
            "ModalitiesInStudy": ("CS", list(row.modalities)),
            "NumberOfStudyRelatedSeries": ("IS", [row.series_count]),
            "NumberOfStudyRelatedInstances": ("IS", [row.instance_count]),
            "InstanceAvailability": ("CS", ["ONLINE"]),
            "StudyInstanceUID": ("UI", [row.study_uid]),
        }) for row, ds in _page(out, query)]

    def series(self, query: Query, study_uid: str | None = None) -> list[dict[str, Any]]:
        rows: list[SeriesRow] = self.index.series(study_uid, _uids(query, "SeriesInstanceUID"))
        studies = set(_uids(query, "StudyInstanceUID"))
        if studies:
            rows = [r for r in rows if r.study_uid in studies]
        if "Modality" in query.filters:
            rows = [r for r in rows if value_matches([r.modality or ""],
                                                     query.filters["Modality"], "Modality")]
        skip = {"StudyInstanceUID", "SeriesInstanceUID", "Modality"}
        out = []
        for row in rows:
            ds = self._header(row.first_instance)
            if ds is None or not _matches(ds, query.filters, skip):
                continue
            out.append((row, ds))
        return [_to_json(ds, SERIES_KEYS, query, {
            "NumberOfSeriesRelatedInstances": ("IS", [row.instance_count]),
            "SeriesInstanceUID": ("UI", [row.series_uid]),
            "StudyInstanceUID": ("UI", [row.study_uid]),
        }) for row, ds in _page(out, query)]

    def instances(self, query: Query, study_uid: str | None = None,
                  series_uid: str | None = None) -> list[dict[str, Any]]:
        sops = _uids(query, "SOPInstanceUID")
        refs: list[InstanceRef] = self.index.instances(study_uid, series_uid,
                                                        sops[0] if len(sops) == 1 else None)
        for keyword, attr in (("StudyInstanceUID", "study_uid"),
                              ("SeriesInstanceUID", "series_uid"),
                              ("SOPInstanceUID", "sop_instance_uid"),
                              ("SOPClassUID", "sop_class_uid")):
            wanted = set(_uids(query, keyword))
            if wanted:
                refs = [r for r in refs if getattr(r, attr) in wanted]
        skip = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
        out = []
        for ref in refs:
            ds = self._header(ref.path)
            if ds is None or not _matches(ds, query.filters, skip):
                continue
            out.append((ref, ds))
            if len(out) >= query.offset + query.limit:
                break
        return [_to_json(ds, INSTANCE_KEYS, query, {
            "InstanceAvailability": ("CS", ["ONLINE"]),
            "SOPInstanceUID": ("UI", [ref.sop_instance_uid]),
            "SeriesInstanceUID": ("UI", [ref.series_uid]),
            "StudyInstanceUID": ("UI", [ref.study_uid]),
        }) for ref, ds in _page(out, query)]
