"""The Dafne experiment across hospitals: does the federation make every site better?

Three sites (CT phantom: A and B similar, C shifted, low contrast and 5 mm slices; the
shipped starter scores ~0.96 at A/B and ~0.56 at C) each receive a stream of studies,
one per generation round. At every site the serving model segments the study, the study
is "corrected" to its ground truth, and one round of the node's own training runs on it
(``dicom_node.learning.incremental.train_round``: touched slices + neighbours, replay of
the site's earlier corrections, the node's ``[learning]`` policy with ``--time-budget``,
Adam's moments kept between a site's rounds). The update goes to the real hub
(``HubService`` in this process: upload intake, validation, the configured strategy,
the gate), declaring as ``num_samples`` the corrections the round trained on (the new
one and those replayed), as a node does; a
one-at-a-time strategy merges each update as it arrives, as a live hub does when the
sites' updates come seconds apart. After each round every site serves the hub's current
generation (a site's local gains are replaced, as on a node).

Arms, side by side in one run, from the same starter and the same studies:

* ``local``: each site alone, serving its own rounds (no hub);
* ``dafne``: Dafne's merge (``merged = 0.5 current + 0.5 update``, gate margin 0.001);
* ``fedasync``, ``fedbuff``, ``fedavg``: the shipped strategies with the hub defaults
  (FedBuff/FedAvg buffer one update per site);
* ``delta``: each update's delta added on arrival (``aggregation.DeltaAsync``);
* ``fedasync+adapt``, ``delta+adapt`` (``delta+adapt`` is what the hub's and the
  node's defaults do, and the arm ``--ours`` judges): that strategy at the hub, and every
  site serves
  its own fit of each generation as a node with ``[federation] adapt`` does
  (``pipeline.site_adaptation``): the generation plus what the site learned on top of
  the generation before (``rebase``), fine-tuned on its replay buffer
  (``--adapt-epochs``, ``--adapt-time-budget``). ``union`` is the hub's shared model.
  Such a site's update is, as on a node (``pipeline.round_update``), a second round
  trained from the generation on the same corrections (``--hub-round``).

Every hub arm's gate scores candidates on a validation set (``--validation`` subjects
per site, never trained on or scored); Dafne's margin is 0.001, the others' the hub's
default. After every round each site's held-out subjects are scored (3D Dice, mean over
labels) with the model it serves; ``union`` is the mean over all sites' held-out sets;
for ``local`` the union is scored per site model. Repeated over ``--seeds`` training
seeds; targets are judged on the mean (see :func:`verdicts`).

For the diagnosis, each hub arm also records the shifted site's own round (its
candidate, scored on its held-out set before the merge): ``retained`` is the share of
that round's gain over the served model that the next generation keeps.

Diagnosis (issue 21, ``--diagnose --held-out 1``, CT, 1 seed; held-out C, starter
0.517, A 0.956). One node round at C with the node's defaults (5 epochs, 50 s) reaches
0.705 (+0.189); with the demo's 2 epochs / 8 s only 0.535 (+0.018). Of that round's
gain, the generation C then serves keeps (node defaults): fedasync 0.7 % (mixing weight
0.8 x 1/(1+16) = 0.047 for ``num_samples = 1``, times the staleness discount), fedbuff
and fedavg 8 %, dafne 11 % (averaging weights keeps far less Dice than its weight),
delta 58 % (but A falls to 0.924: the three deltas add up). Every node then swaps to
that generation, so the local gain is gone and the next round starts again near the
starter: C cannot rise across generations.

    python benchmarks/federated_learning.py                          # 10 rounds, 3 seeds
    python benchmarks/federated_learning.py --seeds 1 --generations 4 --time-budget 10

Writes ``federated_learning[_mr].json`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from federated_arms import ARMS, SITES, Experiment, diagnose, run_arm
from harness import REPO, Clock, args_json, pyplot, save_figure, write_json
from subjects import Case, cached

from dicom_node.config import FederationSettings, LearningSettings, NodeConfig
from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.weights import load_model
from dicom_node.pipeline.training_samples import policy_of
from federation_grpc.hub.config import AggregationConfig

plt = pyplot()


def dataset(kind: str) -> Callable[[str, int, int], Case]:
    if kind == "mr":
        from dicom_node.phantom.mr_atlas import generate_subject as mr_subject

        return cached("mr", mr_subject)
    from dicom_node.phantom.ct import generate_subject

    return cached("ct", generate_subject)


def starter(args: argparse.Namespace) -> tuple[MultiHeadNetwork, ModelConfig]:
    if args.data == "mr":
        from learning import mr_starter  # bootstrapped from MR site A, cached

        model, config, _ = mr_starter(argparse.Namespace(
            out=REPO / "benchmarks" / "out" / "learning-mr", bootstrap_subjects=10,
            bootstrap_budget=300.0, threads=args.threads))
        return model, config
    return load_model(STARTER_DIR / "model.safetensors")


def mean_curves(per_seed: dict[int, dict[str, dict]], arm: str, key: str) -> list[float]:
    curves = [[row["dice"][key] for row in per_seed[s][arm]["rows"]] for s in per_seed]
    return [float(v) for v in np.mean(np.asarray(curves), axis=0)]


def verdicts(per_seed: dict[int, dict[str, dict]], ours: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    """The issue's targets, on the mean over seeds."""
    c = args.shifted_site
    n = min(10, args.generations)
    fed_c, loc_c = mean_curves(per_seed, ours, c), mean_curves(per_seed, "local", c)
    gain = (fed_c[n] - fed_c[0]) / n
    fed_union = mean_curves(per_seed, ours, "union")[-1]
    local_union = {s: mean_curves(per_seed, "local", f"union_{s}")[-1] for s in SITES}
    worst_drop = 0.0
    for seed in per_seed:
        rows = per_seed[seed][ours]["rows"]
        for prev, row in itertools.pairwise(rows):
            worst_drop = max(worst_drop, *(prev["dice"][s] - row["dice"][s] for s in SITES))
    dafne = "dafne" in per_seed[next(iter(per_seed))]
    out: dict[str, Any] = {
        "strategy": ours,
        "shifted_gain_per_generation": round(gain, 5), "gain_met": gain >= 0.007,
        "shifted_final": round(fed_c[-1], 4), "local_only_shifted_final": round(loc_c[-1], 4),
        "share_of_local": round(fed_c[-1] / loc_c[-1], 4),
        "share_met": fed_c[-1] >= 0.95 * loc_c[-1],
        "union_final": round(fed_union, 4),
        "local_only_union_final": {s: round(v, 4) for s, v in local_union.items()},
        "union_met": all(fed_union >= v for v in local_union.values()),
        "worst_drop_any_site_any_seed": round(worst_drop, 4), "no_drop_met": worst_drop <= 0.01,
    }
    if dafne:
        d_c = mean_curves(per_seed, "dafne", c)[-1]
        d_u = mean_curves(per_seed, "dafne", "union")[-1]
        out.update({"dafne_shifted_final": round(d_c, 4), "dafne_union_final": round(d_u, 4),
                    "beats_dafne": fed_c[-1] > d_c and fed_union > d_u})
    return out


def plot(per_seed: dict[int, dict[str, dict]], arms: Sequence[str], path: Path,
         title: str) -> None:
    keys = [*SITES, "union"]
    colour = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), sharey=True)
    for ax, key in zip(axes, keys, strict=True):
        for arm in arms:
            k = key
            if arm == "local" and key == "union":
                for s in SITES:
                    ys = mean_curves(per_seed, arm, f"union_{s}")
                    ax.plot(range(len(ys)), ys, "Ds^"[SITES.index(s)], ms=6, color="k",
                            label=f"local-only {s} model (end)")
                continue
            ys = mean_curves(per_seed, arm, k)
            ax.plot(range(len(ys)), ys, "o-" if arm != "local" else "--", ms=3,
                    color="k" if arm == "local" else colour[arm], label=arm)
        ax.set_title(f"held-out {key}")
        ax.set_xlabel("round (one correction per site)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean over labels)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)


def aggregation_options(text: str) -> dict[str, float]:
    """``key=value,...`` of ``[aggregation]`` numbers (``--aggregation``)."""
    known = {f.name: f.default for f in fields(AggregationConfig) if f.name != "strategy"}
    out: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in known:
            raise argparse.ArgumentTypeError(f"unknown [aggregation] setting {key!r}; "
                                             f"expected one of {sorted(known)}")
        number = float(value)
        out[key.strip()] = int(number) if isinstance(known[key.strip()], int) else number
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    node = LearningSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("ct", "mr"), default="ct")
    p.add_argument("--generations", type=int, default=10, help="rounds (one study per site)")
    p.add_argument("--seeds", type=int, default=3,
                   help="how many training seeds (--first-seed onwards)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first training seed (to add seeds to an earlier run's)")
    p.add_argument("--arms", type=lambda v: v.split(","), default=list(ARMS))
    p.add_argument("--ours", default="delta+adapt",
                   help="the arm the targets judge (the node and hub defaults)")
    fed = FederationSettings()
    p.add_argument("--adapt-epochs", type=int, default=fed.adapt_epochs)
    p.add_argument("--adapt-time-budget", type=float, default=fed.adapt_time_budget_s)
    p.add_argument("--held-out", type=int, default=2, help="held-out subjects per site")
    p.add_argument("--validation", type=int, default=1,
                   help="hub validation subjects per site (0: the gate checks no score)")
    p.add_argument("--time-budget", type=float, default=node.round.time_budget_s)
    p.add_argument("--epochs", type=int, default=node.round.epochs)
    p.add_argument("--neighbours", type=int, default=node.neighbour_slices)
    p.add_argument("--replay-max-slices", type=int, default=node.replay_max_slices)
    p.add_argument("--hub-round", choices=("generation", "as-trained", "change"),
                   default="generation",
                   help="what an adapting site sends: a round trained from the generation "
                        "(the node), its fine-tune's round as trained, or only that round's "
                        "change")
    p.add_argument("--aggregation", type=aggregation_options, default={},
                   help="hub [aggregation] settings for the strategy arms, e.g. "
                        "'sample_halfpoint=2,alpha=0.8' (Dafne's arm keeps its own)")
    p.add_argument("--hub-round-l2sp", type=float, default=node.hub_round_l2sp,
                   help="L2-SP pull toward the generation in an adapting site's hub round "
                        "(FedProx's proximal term, the node's [learning] hub_round_l2sp; "
                        "0: off)")
    p.add_argument("--keep-optimiser-state", action=argparse.BooleanOptionalAction,
                   default=node.keep_optimiser_state)
    p.add_argument("--threads", type=int, default=node.threads)
    p.add_argument("--data-seed", type=int, default=4242)
    p.add_argument("--diagnose", action="store_true",
                   help="one round per site from the starter; each strategy merges the same "
                        "three updates (see diagnose)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "federated_learning")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.first_seed < 0:
        p.error("--seeds must be at least 1 and --first-seed not negative")
    args.seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    args.shifted_site = "C" if args.data == "ct" else "B"
    return args


def experiment(args: argparse.Namespace, log: Callable[[str], None]) -> Experiment:
    """The starter, the studies, held-out and validation subjects, the node's policy."""
    node = LearningSettings()
    data = dataset(args.data)
    init = starter(args)
    held = {s: [data(s, 1000 + i, args.data_seed) for i in range(args.held_out)] for s in SITES}
    validation = [data(s, 2000 + i, args.data_seed) for s in SITES for i in range(args.validation)]
    nc = NodeConfig.model_validate({"learning": {**node.model_dump(), "round": {
        **node.round.model_dump(), "epochs": args.epochs, "time_budget_s": args.time_budget}}})
    policy = replace(policy_of(nc.learning), num_threads=args.threads, anchor_fraction=0.0)
    log(f"data {args.data}, sites {SITES} (shifted {args.shifted_site}), {args.generations} "
        f"rounds, seeds {args.seeds}, arms {args.arms}; policy {args.epochs} epochs, "
        f"{args.time_budget:.0f} s budget, encoder x{policy.encoder_lr_scale}")
    return Experiment(init, data, held, validation, policy, args, log)


def write_results(per_seed: dict[int, dict[str, dict]], seed: int, args: argparse.Namespace,
                  stem: str, seconds: float) -> dict[str, Any]:
    """The seeds every arm has finished: JSON and plot, rewritten after each seed; the
    verdicts (empty unless ``local`` and the judged arm both ran)."""
    done = {s: r for s, r in per_seed.items() if set(r) == set(args.arms)}
    summary: dict[str, Any] = {}
    if "local" in args.arms and args.ours in args.arms:
        summary = verdicts(done, args.ours, args)
    write_json(args.out / f"{stem}.json", {
        "args": args_json(args),
        "mean": {arm: {k: mean_curves(done, arm, k) for k in done[seed][arm]["rows"][0]["dice"]}
                 for arm in args.arms},
        "per_seed": {str(s): r for s, r in done.items()}, "verdicts": summary,
        "seconds": round(seconds, 1)})
    plot(done, args.arms, args.out / f"{stem}.png",
         f"{args.data.upper()}: mean of {len(done)} seed(s); one correction per site "
         f"per round; shifted site {args.shifted_site}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = Clock()
    ex = experiment(args, clock.log)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "federated_learning" + ("_mr" if args.data == "mr" else "")
    if args.diagnose:
        write_json(args.out / f"{stem}_diagnosis.json", {"args": args_json(args),
                                                         **diagnose(ex)})
        return 0
    per_seed: dict[int, dict[str, dict]] = {}
    summary: dict[str, Any] = {}
    for seed in args.seeds:
        per_seed[seed] = {}
        for arm in args.arms:
            torch.manual_seed(seed)
            per_seed[seed][arm] = run_arm(arm, ex, seed)
        summary = write_results(per_seed, seed, args, stem, clock.seconds)
    print(json.dumps(summary, indent=2))
    clock.log(f"wrote {args.out / (stem + '.json')} and .png")
    return 0 if summary and all(v for k, v in summary.items() if k.endswith("_met")
                                or k == "beats_dafne") else 1


if __name__ == "__main__":
    raise SystemExit(main())
