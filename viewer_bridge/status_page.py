"""The status page: queues, recent segmentations and corrections, Dice over generations.

Everything here comes from the index (UIDs, states, numbers); no patient data.
"""

from __future__ import annotations

import html
import logging
from collections import defaultdict
from statistics import fmean
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select

from dicom_node.status import node_status
from dicom_node.store.db import Database
from dicom_node.store.models import Correction, Segmentation, Series, Study

LOGGER = logging.getLogger(__name__)


def _mean_dice(dice: dict[str, Any] | None) -> float | None:
    values = [float(v) for v in (dice or {}).values() if isinstance(v, int | float)]
    return fmean(values) if values else None


def status_data(db: Database, *, recent: int = 20) -> dict[str, Any]:
    """What the page shows, as one JSON-able dict (also served as /status.json)."""
    report = node_status(db, recent=recent)
    with db.session() as s:
        segs = s.execute(
            select(Segmentation, Study.study_uid)
            .join(Series, Series.series_uid == Segmentation.series_uid, isouter=True)
            .join(Study, Study.id == Series.study_id, isouter=True)
            .order_by(Segmentation.id.desc()).limit(recent)).all()
        corrections = s.execute(
            select(Correction, Study.study_uid)
            .join(Series, Series.series_uid == Correction.seg_series_uid, isouter=True)
            .join(Study, Study.id == Series.study_id, isouter=True)
            .order_by(Correction.id.desc())).all()
    report["segmentations"] = [{
        "study_uid": study, "series_uid": seg.series_uid, "model": seg.model_name,
        "generation": seg.generation, "seg_series_uid": seg.seg_series_uid,
        "at": seg.created_at.isoformat(),
    } for seg, study in segs]
    report["corrections"] = [{
        "study_uid": study, "seg_series_uid": c.seg_series_uid,
        "source_series_uid": c.source_series_uid, "model": c.model_name,
        "generation": c.ai_generation, "state": c.state, "reason": c.reason,
        "dice": c.dice, "mean_dice": _mean_dice(c.dice), "at": c.created_at.isoformat(),
    } for c, study in corrections[:recent]]
    by_generation: dict[int, list[float]] = defaultdict(list)
    for c, _ in corrections:
        mean = _mean_dice(c.dice)
        if mean is not None and c.ai_generation is not None:
            by_generation[int(c.ai_generation)].append(mean)
    report["dice_by_generation"] = [
        {"generation": g, "mean_dice": fmean(v), "corrections": len(v)}
        for g, v in sorted(by_generation.items())]
    return report


def dice_svg(points: list[dict[str, Any]], width: int = 520, height: int = 220) -> str:
    """Mean Dice (AI vs corrected) per model generation, as an inline SVG line plot."""
    pad = 40
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'role="img" aria-label="Dice over generations"><text x="{pad}" '
                f'y="{height // 2}">No corrections yet</text></svg>')
    gens = [p["generation"] for p in points]
    g0, g1 = min(gens), max(gens)
    span = max(g1 - g0, 1)
    low = min(0.5, *(p["mean_dice"] for p in points))

    def xy(p: dict[str, Any]) -> tuple[float, float]:
        x = pad + (p["generation"] - g0) / span * (width - 2 * pad)
        y = height - pad - (p["mean_dice"] - low) / (1 - low or 1) * (height - 2 * pad)
        return x, y

    coords = [xy(p) for p in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4"><title>generation {p["generation"]}: '
        f'{p["mean_dice"]:.3f} ({p["corrections"]} corrections)</title></circle>'
        for (x, y), p in zip(coords, points, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="Dice over generations" font-size="11">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'stroke="#888"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
        f'stroke="#888"/>'
        f'<text x="{width // 2}" y="{height - 8}" text-anchor="middle">model generation '
        f'({g0} to {g1})</text>'
        f'<text x="4" y="{pad - 8}">Dice</text>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">1.0</text>'
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{low:.2f}</text>'
        f'<polyline points="{line}" fill="none" stroke="#2a6fdb" stroke-width="2"/>'
        f'<g fill="#2a6fdb">{dots}</g></svg>')


def viewer_link(ohif_base: str, study_uid: str | None, series_uid: str | None = None) -> str:
    if not study_uid:
        return ""
    params = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        params["initialSeriesInstanceUID"] = series_uid
    url = f"{ohif_base.rstrip('/')}/viewer?{urlencode(params)}"
    return f'<a href="{html.escape(url)}">open in OHIF</a>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_status_page(data: dict[str, Any], ohif_base: str) -> str:
    e = html.escape
    queues = [[e(kind), e(", ".join(f"{k}={v}" for k, v in sorted(states.items())))]
              for kind, states in sorted(data["jobs"].items())]
    outbox = [[e(dest), e(", ".join(f"{k}={v}" for k, v in sorted(states.items())))]
              for dest, states in sorted(data["outbox"].items())]
    series = [[e(str(k)), str(v)] for k, v in sorted(data["series"].items())]
    segs = [[e(s["at"][:19]), e(s["model"]), str(s["generation"]),
             f"<code>{e(s['series_uid'])}</code>",
             viewer_link(ohif_base, s["study_uid"], s["seg_series_uid"])]
            for s in data["segmentations"]]
    corrs = [[e(c["at"][:19]), e(c["state"]), e(str(c["generation"])),
              "" if c["mean_dice"] is None else f"{c['mean_dice']:.3f}",
              e(c["reason"] or ""), viewer_link(ohif_base, c["study_uid"],
                                                c["seg_series_uid"])]
             for c in data["corrections"]]
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Tessera node status</title><meta http-equiv="refresh" content="30">
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}</style></head><body>
<h1>Tessera node status</h1>
<h2>Queues</h2>{_table(["job kind", "states"], queues)}
<h3>Outbox</h3>{_table(["destination", "states"], outbox)}
<h3>Series</h3>{_table(["state", "count"], series)}
<h2>Dice over generations</h2>{dice_svg(data["dice_by_generation"])}
<h2>Recent segmentations</h2>
{_table(["at (UTC)", "model", "generation", "source series", "viewer"], segs)}
<h2>Recent corrections</h2>
{_table(["at (UTC)", "state", "AI generation", "mean Dice", "reason", "viewer"], corrs)}
</body></html>"""
