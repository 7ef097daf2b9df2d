"""Usage statistics of learning from corrections, as Dafne reports them.

Corrections per day (by outcome), Dice of the AI result against the correction per
label over time, the latest corrections, and the model versions with their lineage.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.store.models import Correction, CorrectionState, ModelVersion


def learning_usage(s: Session, *, recent: int = 10) -> dict[str, Any]:
    per_day: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    dice_lists: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_generation: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    latest = []
    rows = list(s.execute(select(Correction).order_by(Correction.id)).scalars())
    for c in rows:
        day = c.created_at.date().isoformat()
        per_day[day][c.state] += 1
        if c.state in (CorrectionState.RECORDED, CorrectionState.ACCEPTED):
            for label, value in (c.dice or {}).items():
                dice_lists[day][label].append(float(value))
                by_generation[str(c.ai_generation)][label].append(float(value))
    for c in rows[-recent:][::-1]:
        latest.append({"at": c.created_at.isoformat(), "state": c.state,
                       "series_uid": c.source_series_uid, "generation": c.ai_generation,
                       "dice": c.dice, "changed_slices": len(c.changed_slices or []),
                       "delay_s": c.delay_s, "reason": c.reason,
                       "unknown_segments": c.unknown_segments})
    models = [
        {"name": v.name, "generation": v.generation, "parent": v.parent_generation,
         "state": v.state, "origin": v.origin, "samples": v.samples,
         "held_out_dice": ((v.metrics or {}).get("held_out") or {}).get("candidate")}
        for v in s.execute(select(ModelVersion).order_by(ModelVersion.name,
                                                         ModelVersion.generation)).scalars()
    ]
    return {
        "corrections_per_day": {d: dict(v) for d, v in sorted(per_day.items())},
        "dice_per_day": _means(dice_lists),
        "dice_per_generation": _means(by_generation),
        "recent_corrections": latest,
        "model_versions": models,
    }


def _means(table: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {k: {label: round(float(np.mean(v)), 4) for label, v in sorted(labels.items())}
            for k, labels in sorted(table.items())}


def render_learning(usage: dict[str, Any]) -> list[str]:
    lines = ["Corrections per day:"]
    for day, states in usage["corrections_per_day"].items():
        lines.append(f"  {day} " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    if not usage["corrections_per_day"]:
        lines.append("  (none)")
    if usage["dice_per_day"]:
        lines.append("Dice AI vs corrected per label (mean per day):")
        for day, labels in usage["dice_per_day"].items():
            lines.append(f"  {day} " + " ".join(f"{k}={v:.3f}" for k, v in labels.items()))
    for c in usage["recent_corrections"]:
        if c["state"] in ("flagged", "ignored"):
            lines.append(f"  {c['at']} {c['state']}: {c['reason']}")
        elif c["unknown_segments"]:
            lines.append(f"  {c['at']} {c['state']}: segments matching no model label "
                         f"(not trained on): {', '.join(c['unknown_segments'])}")
    if usage["model_versions"]:
        lines.append("Model versions:")
        for v in usage["model_versions"]:
            held = v["held_out_dice"] or {}
            score = f" held-out Dice {held['mean']:.3f}" if "mean" in held else ""
            lines.append(f"  {v['name']} gen {v['generation']} [{v['state']}] "
                         f"{v['origin']} parent={v['parent']} samples={v['samples']}{score}")
    return lines
