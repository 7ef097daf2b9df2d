"""Federated CT quality control: does the hub's linear model flag bad segmentations on
an out-of-distribution site?

The shipped starter model (trained on phantom site A) segments phantom CT studies; the
node's own code computes the quality metrics (``segment_volume`` then
``quality_metrics``, as ``pipeline/segmentation.py`` does) and the true Dice against the
phantom's ground truth (mean over the model's labels, what a full correction would
report). Records are built as the node reports them (``dicom_node.federation``):
corrections carry the metrics plus ``dice.<label>``, segmentations the metrics only.

- fitting set (in-distribution, "corrections"): sites A and B, each case rendered with
  scanner settings jittered around the site's (noise, contrast phase, HU offset,
  sharpness) so that Dice spreads;
- OOD sites (scored, never fitted on): C (thick slices, wide field of view, weak
  contrast) and D (noisy, strong contrast, thin slices), jittered the same way.

The hub's code (``federation_grpc.hub.quality``: ridge on standardised metrics, threshold
from leave-one-out predictions at ``--target-fp``) fits on the corrections and flags
OOD segmentations. Target (issue 8, seed paper > 70%): on the OOD site(s), flag >= 70%
of segmentations with true Dice < 0.8 at <= 20% false positives (good segmentations
flagged). A one-feature baseline (mean entropy alone, same threshold rule) is shown for
comparison.

``--data mr``: real anatomy (Colin27 + AAL from Debian's mricron-data,
``dicom_node.phantom.mr_atlas``). An MR starter is bootstrapped from MR site A as
``benchmarks/learning.py --data mr`` does (cached in ``--out``); the fit set is MR sites
A and C, the OOD site is B (1.5 T: other gamma, stronger bias field, 3 mm slices),
each case jittered (noise, gamma, bias field).

Run: ``nice python benchmarks/quality.py [--data ct|mr] [--fit-cases 60] [--ood-cases 40]
[--out DIR]``. Cases are cached in ``DIR/cases.jsonl`` (delete it to regenerate); writes
``quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from harness import pyplot, save_figure, write_json

from federation_grpc.hub.quality import (
    CORRECTION,
    SEGMENTATION,
    Case,
    QualityPolicy,
    assess,
    fit_model,
)
from federation_grpc.hub.reports import check_numbers

plt = pyplot()  # files only; at start so a missing `bench` extra fails at once
LOGGER = logging.getLogger("benchmarks.quality")
SITES = {"ct": (("A", "B"), ("C", "D")), "mr": (("A", "C"), ("B",))}  # (fit, OOD)
FIT_SITES, OOD_SITES = SITES["ct"]


def jittered_profile(data: str, site: str, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """The site's scanner settings, varied per case so that Dice spreads."""
    if data == "mr":
        from dicom_node.phantom import mr_atlas

        mr = mr_atlas.SITES[site]
        return replace(mr, name=f"{site}~", noise=mr.noise * float(rng.uniform(0.7, 4.0)),
                       gamma=mr.gamma * float(rng.uniform(0.8, 1.25)),
                       bias=float(np.clip(mr.bias * rng.uniform(0.5, 3.0), 0.0, 0.8)))
    from dicom_node.phantom.ct import site_profile

    base = site_profile(site)
    return replace(
        base,
        name=f"{site}~",
        noise_hu=base.noise_hu * float(rng.uniform(0.7, 3.0)),
        enhancement=float(np.clip(base.enhancement * rng.uniform(0.35, 1.3), 0.0, 1.5)),
        hu_offset=base.hu_offset + float(rng.normal(0, 25)),
        blur_px=float(np.clip(base.blur_px * rng.uniform(0.5, 2.0), 0.0, 2.0)),
    )


def run_case(model, config, data: str, site: str, index: int, seed: int) -> dict:  # type: ignore[no-untyped-def]
    """Segment one jittered subject with the node's code; metrics and true Dice."""
    from dataclasses import asdict

    from dicom_node.learning.inference import segment_volume
    from dicom_node.learning.scores import dice_per_label, quality_metrics
    from dicom_node.phantom import ct, mr_atlas

    rng = ct.subject_rng("quality-benchmark", site, index, seed, 7)
    profile = jittered_profile(data, site, rng)
    generate = mr_atlas.generate_subject if data == "mr" else ct.generate_subject
    subject = generate(site, index, seed, profile=profile)
    result = segment_volume(model, config, subject.image.astype(np.float32), subject.spacing)
    metrics = quality_metrics(result.labels, result.confidence, result.entropy,
                              result.spacing, config.label_values)
    dice = dice_per_label(result.labels, subject.labels, config.label_values)
    return {"site": site, "index": index, "metrics": metrics, "dice": dice,
            "profile": {k: v for k, v in asdict(profile).items()
                        if isinstance(v, float)}}


def load_starter(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.data == "mr":
        from learning import mr_starter  # the MR starter of learning.py, cached under --out

        model, config, _ = mr_starter(argparse.Namespace(
            out=args.out, bootstrap_subjects=args.bootstrap_subjects,
            bootstrap_budget=args.bootstrap_budget, threads=args.threads))
        return model, config
    from dicom_node.learning.bootstrap import STARTER_DIR
    from dicom_node.learning.weights import load_model

    return load_model(STARTER_DIR / "model.safetensors")


def collect(args: argparse.Namespace, cache: Path) -> list[dict]:
    rows: dict[tuple[str, int], dict] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            rows[(row["site"], row["index"])] = row
    wanted = [(s, i) for i in range(args.fit_cases // len(FIT_SITES)) for s in FIT_SITES]
    wanted += [(s, 1000 + i) for i in range(args.ood_cases // len(OOD_SITES))
               for s in OOD_SITES]
    missing = [w for w in wanted if w not in rows]
    if missing:
        import torch

        torch.set_num_threads(args.threads)
        model, config = load_starter(args)
        cache.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with cache.open("a") as f:
            for k, (site, index) in enumerate(missing, start=1):
                row = run_case(model, config, args.data, site, index, args.seed)
                rows[(site, index)] = row
                f.write(json.dumps(row) + "\n")
                f.flush()
                mean = np.mean(list(row["dice"].values()))
                print(f"[{k}/{len(missing)}] site {site} #{index}: Dice {mean:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return [rows[w] for w in wanted]


def as_case(row: dict, kind: str, seq: int) -> Case:
    """The record the node would send (same keys, same intake check at the hub)."""
    values = {"segmentation_seq": float(seq), **row["metrics"]}
    if kind == CORRECTION:
        values.update({f"dice.{k}": v for k, v in row["dice"].items()})
    values = check_numbers(values, kind)
    return Case(f"site-{row['site']}", kind, 0, values, seq)


def true_dice(row: dict) -> float:
    return float(np.mean(list(row["dice"].values())))


def rates(flagged: np.ndarray, dice: np.ndarray, low: float) -> dict:
    bad = dice < low
    return {"n": int(dice.size), "low": int(bad.sum()),
            "recall": float(flagged[bad].mean()) if bad.any() else None,
            "false_positive_rate": float(flagged[~bad].mean()) if (~bad).any() else None,
            "flagged": int(flagged.sum())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-cases", type=int, default=60)
    parser.add_argument("--ood-cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-fp", type=float, default=0.1)
    parser.add_argument("--low-dice", type=float, default=0.8,
                        help="true Dice below this is low quality (the target is for 0.8)")
    parser.add_argument("--data", choices=("ct", "mr"), default="ct",
                        help="ct: the CT phantom; mr: real anatomy (MR atlas)")
    parser.add_argument("--bootstrap-subjects", type=int, default=10, help="MR starter")
    parser.add_argument("--bootstrap-budget", type=float, default=300.0, help="MR starter, s")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/out/quality (ct) or quality-mr")
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/out/quality" + ("-mr" if args.data == "mr" else ""))
    return args


def fit_summary(model: Any) -> dict:
    """The fitted model as reported: fit quality, threshold, the largest coefficients."""
    return {"n": model.n, "r2": model.fit.r2, "loo_r2": model.fit.loo_r2,
            "alpha": model.fit.alpha, "threshold": model.threshold,
            "features": len(model.features),
            "top_coefficients": dict(sorted(
                zip(model.features, map(float, model.fit.coef), strict=True),
                key=lambda kv: -abs(kv[1]))[:8])}


def mean_entropy_baseline(train: list[Case], policy: QualityPolicy) -> Any:
    """The one-feature comparison: mean entropy alone, same threshold rule."""
    baseline, _ = fit_model([Case(c.node_id, c.kind, 0, {
        "mean_entropy": c.values["mean_entropy"],
        **{k: v for k, v in c.values.items() if k.startswith("dice.")}}) for c in train],
        policy)
    assert baseline is not None
    return baseline


def score_ood(rows: list[dict], model: Any, baseline: Any, policy: QualityPolicy,
              results: dict, plot_sets: dict) -> list[Case]:
    """Each OOD site's segmentations flagged by the model and the baseline, and pooled;
    the OOD records."""
    ood_cases, ood_y, ood_pred = [], [], []
    for site in OOD_SITES:
        site_rows = [r for r in rows if r["site"] == site]
        cases = [as_case(r, SEGMENTATION, 10_000 + i) for i, r in enumerate(site_rows)]
        y = np.array([true_dice(r) for r in site_rows])
        pred = model.predict(cases)
        base_pred = baseline.predict(cases)
        results["ood"][site] = {
            "model": rates(pred < model.threshold, y, policy.low_dice),
            "baseline_mean_entropy": rates(base_pred < baseline.threshold, y, policy.low_dice),
            "mean_true_dice": float(y.mean()), "mean_predicted_dice": float(pred.mean()),
            "mae": float(np.abs(pred - y).mean()),
        }
        plot_sets[f"OOD site {site}"] = (y, pred)
        ood_cases += cases
        ood_y.append(y)
        ood_pred.append(pred)
    y_all, p_all = np.concatenate(ood_y), np.concatenate(ood_pred)
    base_all = baseline.predict(ood_cases)
    results["ood"]["pooled"] = {
        "model": rates(p_all < model.threshold, y_all, policy.low_dice),
        "baseline_mean_entropy": rates(base_all < baseline.threshold, y_all, policy.low_dice),
        "mae": float(np.abs(p_all - y_all).mean()),
    }
    return ood_cases


def hub_report(train: list[Case], ood_cases: list[Case], policy: QualityPolicy,
               results: dict) -> None:
    """The hub's whole report on these records, as `tessera hub quality` would show it."""
    report = assess(train + ood_cases, policy).as_dict()
    results["hub_report_groups"] = report["groups"]
    results["hub_report_drift"] = [{k: d[k] for k in ("node", "mean_predicted_dice",
                                                      "dice_drop", "mean_abs_shift_sd",
                                                      "drifting")} for d in report["drift"]]


def print_results(results: dict, policy: QualityPolicy) -> None:
    m = results["model"]
    print(f"\nfit on {m['n']} corrections (sites {', '.join(FIT_SITES)}): R² {m['r2']:.3f}, "
          f"leave-one-out R² {m['loo_r2']:.3f}, {m['features']} features, alpha "
          f"{m['alpha']:g}, flag when predicted Dice < {m['threshold']:.3f}")
    f = results["fit_set_loo"]
    print(f"fit set (leave-one-out): {f['low']}/{f['n']} low, recall {_pct(f['recall'])}, "
          f"false positives {_pct(f['false_positive_rate'])}")
    for site, r in results["ood"].items():
        mm, bb = r["model"], r["baseline_mean_entropy"]
        print(f"OOD {site:>6}: {mm['low']}/{mm['n']} with Dice < {policy.low_dice}: recall "
              f"{_pct(mm['recall'])} at {_pct(mm['false_positive_rate'])} false positives "
              f"(mean-entropy baseline: {_pct(bb['recall'])} at "
              f"{_pct(bb['false_positive_rate'])}); MAE {r['mae']:.3f}")
    print(f"target (recall >= 70% at <= 20% FP on OOD, pooled, low = Dice < "
          f"{policy.low_dice:g}): "
          f"{'met' if results['target_met'] else 'NOT met'}")


def main() -> int:
    args = parse_args()
    global FIT_SITES, OOD_SITES
    FIT_SITES, OOD_SITES = SITES[args.data]
    logging.basicConfig(level=logging.WARNING)

    rows = collect(args, args.out / "cases.jsonl")
    policy = QualityPolicy(low_dice=args.low_dice, target_fp_rate=args.target_fp)
    fit_rows = [r for r in rows if r["site"] in FIT_SITES]
    train = [as_case(r, CORRECTION, i) for i, r in enumerate(fit_rows, start=1)]
    model, message = fit_model(train, policy)
    if model is None:
        print(f"cannot fit: {message}")
        return 1
    y_fit = np.array([true_dice(r) for r in fit_rows])
    loo = np.clip(model.fit.loo_predictions, 0, 1)
    results: dict = {
        "data": args.data, "fit_sites": FIT_SITES, "ood_sites": OOD_SITES,
        "policy": {"low_dice": policy.low_dice, "target_fp_rate": policy.target_fp_rate},
        "model": fit_summary(model),
        "fit_set_loo": rates(loo < model.threshold, y_fit, policy.low_dice),
        "ood": {},
    }
    baseline = mean_entropy_baseline(train, policy)
    plot_sets = {"fit (leave-one-out)": (y_fit, loo)}
    ood_cases = score_ood(rows, model, baseline, policy, results, plot_sets)
    hub_report(train, ood_cases, policy, results)
    results["cases"] = [{"site": r["site"], "index": r["index"], "dice": true_dice(r),
                         "profile": r["profile"]} for r in rows]
    pooled = results["ood"]["pooled"]["model"]
    results["target_met"] = bool(pooled["recall"] is not None and pooled["recall"] >= 0.7
                                 and pooled["false_positive_rate"] is not None
                                 and pooled["false_positive_rate"] <= 0.2)

    print_results(results, policy)
    write_json(args.out / "quality.json", results)
    title = "MR atlas (real anatomy)" if args.data == "mr" else "phantom CT"
    plot(plot_sets, model.threshold, policy.low_dice, args.out / "quality.png", title)
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.png'}")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def plot(sets: dict, threshold: float, low: float, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for (label, (y, p)), marker in zip(sets.items(), "o^sv", strict=False):
        ax.scatter(y, p, label=label, marker=marker, alpha=0.7, s=22)
    ax.axvline(low, color="grey", ls="--", lw=1, label=f"low quality: true Dice < {low}")
    ax.axhline(threshold, color="red", ls=":", lw=1, label=f"flag: predicted < {threshold:.3f}")
    ax.plot([0, 1], [0, 1], color="black", lw=0.5)
    ax.set_xlabel("true Dice (phantom ground truth, mean over labels)")
    ax.set_ylabel("predicted Dice (hub linear model)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Quality monitoring: starter model on {title}")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
