"""``tessera hub quality``: the quality model, flags and drift; registered by
:mod:`federation_grpc.hub.cli`.

Opens the hub database directly, like the other admin commands, and fits the model on
what is stored now (see :mod:`federation_grpc.hub.quality`). ``--json`` prints the
report as one JSON document for scripts; the hub status page (``/status`` on the
metrics port) shows the same report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from federation_grpc.hub.cli_common import config_at, out


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    console = out()
    m = report["model"]
    r = report["records"]
    console.print(f"records: {r['segmentation']} segmentations, {r['correction']} corrections "
                  f"({r['correction_without_metrics']} without metrics), "
                  f"{r['ignored']} ignored")
    for reason, n in sorted(report["ignored"]["reasons"].items()):
        console.print(f"  ignored {n}: {reason}")
    if m["status"] != "fitted":
        console.print(f"[yellow]quality model not fitted:[/yellow] {m['message']}")
    else:
        console.print(
            f"quality model: n={m['n']} R²={m['r2']:.3f} (leave-one-out {m['loo_r2']:.3f}), "
            f"ridge alpha={m['alpha']:g}, flag when predicted Dice < {m['threshold']:.3f} "
            f"(low quality: Dice < {report['policy']['low_dice']:g}); on training cases "
            f"recall {_fmt(m['training_recall'], '.0%')}, "
            f"false positives {_fmt(m['training_fp_rate'], '.0%')}")
        coefs = Table("feature", "coefficient (per SD)", title=f"intercept {m['intercept']:.3f}")
        for name, c in sorted(m["coefficients"].items(), key=lambda kv: -abs(kv[1])):
            coefs.add_row(name, f"{c:+.4f}")
        console.print(coefs)
    groups = Table("node", "gen", "segmentations", "flagged", "flag rate", "mean pred. Dice",
                   "corrections", "mean Dice", "known low", title="per node and generation")
    for g in report["groups"]:
        groups.add_row(g["node"], str(g["generation"]), str(g["segmentations"]),
                       _fmt(g["flagged"], "d"), _fmt(g["flag_rate"], ".0%"),
                       _fmt(g["mean_predicted_dice"]), str(g["corrections"]),
                       _fmt(g["mean_dice"]), str(g["known_low"]))
    console.print(groups)
    if report["drift"]:
        drift = Table("node", "gen", "n", "pred. Dice", "drop", "shift (SD)", "top shifts",
                      "drifting", title="drift against the training cases")
        for d in report["drift"]:
            drift.add_row(d["node"], str(d["generation"]), str(d["segmentations"]),
                          _fmt(d["mean_predicted_dice"]), _fmt(d["dice_drop"], "+.3f"),
                          _fmt(d["mean_abs_shift_sd"], ".2f"),
                          ", ".join(f"{k} {v:+.1f}" for k, v in d["top_shifts"].items()),
                          "[red]yes[/red]" if d["drifting"] else "")
        console.print(drift)
    if report["flagged"]:
        flagged = Table("node", "gen", "segmentation seq", "predicted Dice",
                        title="flagged segmentations (worst first; seq is the node's own id)")
        for f in report["flagged"]:
            flagged.add_row(f["node"], str(f["generation"]), _fmt(f["segmentation_seq"], "d"),
                            f"{f['predicted_dice']:.3f}")
        console.print(flagged)


def quality(
    config: Annotated[
        Path, typer.Option("--config", "-c", envvar="TESSERA_HUB_CONFIG",
                           help="Hub TOML file (tessera hub init).")
    ] = Path("hub.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    low_dice: Annotated[float, typer.Option(help="Dice below which a segmentation is low "
                                                 "quality.")] = 0.8,
    target_fp_rate: Annotated[float, typer.Option(help="Share of good training cases the "
                                                       "threshold may flag.")] = 0.1,
    min_cases: Annotated[int, typer.Option(help="Corrections needed to fit.")] = 10,
) -> None:
    """Quality monitoring: fit Dice ~ metrics, flag segmentations per node and generation,
    show drift."""
    from federation_grpc.hub.quality import QualityPolicy, report_for_store
    from federation_grpc.hub.store import HubStore

    try:
        policy = QualityPolicy(low_dice=low_dice, target_fp_rate=target_fp_rate,
                               min_cases=min_cases)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = config_at(config)
    store = HubStore(settings.resolved_database_url)
    try:
        report = report_for_store(store, policy)
    finally:
        store.dispose()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``tessera hub``."""
    app.command("quality")(quality)
