"""The arms of the federated experiment (``federated_learning.py``) and its diagnosis.

An arm is one way for three sites to learn from one correction per site and round:
alone (``local``), or through the real hub with one strategy (``dafne``, ``fedasync``,
``delta`` ...), every site then serving the hub's generation or, with ``+adapt``, its
own fine-tune of it. :func:`run_arm` plays ``--generations`` rounds of an arm and scores
every site after each; :func:`diagnose` merges the same three updates with each strategy
to see how much of the shifted site's round the generation keeps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from corrections import correction_sample, replay_within
from hub_in_process import current_model, enrol, start_hub, upload
from safetensors.numpy import save as tensors_to_bytes
from subjects import Case

from dicom_node.learning.incremental import train_round, trained_groups, update_artifact
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.slices import SliceSample
from dicom_node.learning.weights import model_from_bytes
from dicom_node.pipeline.site_adaptation import rebase
from federation_grpc.hub.config import GateConfig
from federation_grpc.hub.service import HubService

ARMS = ("local", "delta", "dafne", "fedasync", "fedbuff", "fedavg", "fedasync+adapt",
        "delta+adapt")
ADAPT = "+adapt"  # the arm's sites serve their own fine-tune of each generation
SITES = ("A", "B", "C")


def score(model: MultiHeadNetwork, config: ModelConfig, cases: Sequence[Case]) -> float:
    """Mean over ``cases`` of the 3D Dice averaged over labels."""
    per = []
    for image, truth, spacing in cases:
        d = dice_per_label(segment_volume(model, config, image, spacing).labels, truth,
                           config.label_values)
        per.append(float(np.mean(list(d.values()))))
    return float(np.mean(per))


class UnionEvaluator:
    """The hub gate's validation set: mean Dice over every site's validation subjects."""

    def __init__(self, config: ModelConfig, cases: Sequence[Case]) -> None:
        self.config, self.cases = config, cases

    def evaluate(self, tensors: Mapping[str, np.ndarray], config_json: str) -> float:
        model, _ = model_from_bytes(tensors_to_bytes(dict(tensors)), self.config)
        return score(model, self.config, self.cases)


@dataclass
class Site:
    name: str
    model: MultiHeadNetwork
    config: ModelConfig
    replay: list[list[SliceSample]] = field(default_factory=list)
    moments: dict | None = None


@dataclass
class Experiment:
    """What every arm of a run shares: the starter, the studies, the held-out and
    validation subjects, the node's policy and the options."""

    init: tuple[MultiHeadNetwork, ModelConfig]
    data: Callable[..., Case]
    held: dict[str, list[Case]]
    validation: list[Case]
    policy: TrainingPolicy
    args: argparse.Namespace
    log: Callable[[str], None]


def correct_and_train(site: Site, case: Case, policy: TrainingPolicy, args: argparse.Namespace,
                      ) -> tuple[MultiHeadNetwork, list[str]]:
    """One correction at ``site``: segment, take the touched slices, train a round."""
    image, labels, spacing = case
    _, sample = correction_sample(site.model, site.config, image, labels, spacing,
                                  args.neighbours)
    old = replay_within(site.replay, args.replay_max_slices)
    candidate, report = train_round(site.model, site.config, sample, old, policy,
                                    optimiser_state=site.moments)
    site.moments = report.optimiser_state if site.moments is not None else None
    site.replay.insert(0, sample)
    return candidate, trained_groups(report)


def hub_for(folder: Path, strategy: str, init: tuple[MultiHeadNetwork, ModelConfig],
            evaluator: UnionEvaluator | None,
            aggregation: Mapping[str, float] | None = None) -> HubService:
    """The arm's hub: Dafne's gate (margin 0.001, accept or refuse the whole step),
    the others' the hub's defaults; ``aggregation`` overrides ``[aggregation]``
    settings (``--aggregation``)."""
    if strategy == "dafne":
        return start_hub(folder, strategy, len(SITES), *init, evaluator,
                         validation_margin=0.001, backtrack=0)
    return start_hub(folder, strategy, len(SITES), *init, evaluator,
                     aggregation=aggregation, validation_margin=GateConfig().validation_margin)


def arm_scores(arm: str, config: ModelConfig, held: dict[str, list[Case]],
               models: dict[str, MultiHeadNetwork], last: bool = True,
               shared: MultiHeadNetwork | None = None) -> dict[str, float]:
    """Dice of each site's held-out subjects with the model it serves, and the union's."""
    if arm.endswith(ADAPT) and shared is not None:  # each site its fine-tune; the union: hub's
        out = {s: score(models[s], config, held[s]) for s in SITES}
        out["union"] = float(np.mean([score(shared, config, held[s]) for s in SITES]))
        return out
    if arm == "local":  # each site its own model; the union per site model, at the end
        union_cases = [c for s in SITES for c in held[s]]
        out = {s: score(models[s], config, held[s]) for s in SITES}
        out.update({f"union_{s}": score(models[s], config, union_cases) if last
                    else float("nan") for s in SITES})
        return out
    shared = models[SITES[0]]
    out = {s: score(shared, config, held[s]) for s in SITES}
    out["union"] = float(np.mean([out[s] for s in SITES]))
    return out


def train_sites(ex: Experiment, sites: dict[str, Site], hub: HubService | None,
                nodes: dict[str, str], r: int, seed: int, served_before: dict[str, float],
                diag: dict[str, float], adapt: bool) -> dict[str, MultiHeadNetwork]:
    """Round ``r`` at every site: a correction, a round of training, the update to the
    hub (merged at once by a one-at-a-time strategy); each site's candidate."""
    config = ex.init[1]
    base = 0 if hub is None else hub.require_current().number
    base_model = None if hub is None else current_model(hub, config)
    rounds: dict[str, MultiHeadNetwork] = {}  # what each node serves until the swap
    for i, s in enumerate(SITES):
        site = sites[s]
        start = site.model
        candidate, groups = correct_and_train(
            site, ex.data(s, r - 1, ex.args.data_seed),
            replace(ex.policy, seed=seed * 1000 + r * 10 + i), ex.args)
        rounds[s] = candidate
        if hub is None:
            site.model = candidate
            continue
        if s == ex.args.shifted_site:
            diag["served_before"] = served_before[s]
            diag["candidate"] = score(candidate, config, ex.held[s])
        assert base_model is not None
        sent, samples = hub_round(ex, site, base_model, start, candidate, config,
                                  replace(ex.policy, seed=seed * 1000 + r * 10 + 7 + i),
                                  adapt)
        payload, _ = update_artifact(sent, groups, {"site": s})
        upload(hub, nodes[s], payload, groups, base, num_samples=samples)
        if hub.strategy.batch_size() == 1:
            hub.aggregator.process_pending()
    return rounds


def hub_round(ex: Experiment, site: Site, generation: MultiHeadNetwork, start: MultiHeadNetwork,
              candidate: MultiHeadNetwork, config: ModelConfig, policy: TrainingPolicy,
              adapt: bool) -> tuple[MultiHeadNetwork, int]:
    """What a site sends, and for how many corrections (the new one and those replayed),
    as a node does: a round that started from the generation as trained; at a site
    serving its own fine-tune, a round trained again from the generation on the same
    corrections (``pipeline.round_update``). ``--hub-round as-trained``: the fine-tune's
    round as trained (before); ``change``: only that round's change, on the generation."""
    new, *older = site.replay
    replay = replay_within(older, ex.args.replay_max_slices)
    kept = {id(x) for x in replay}
    samples = 1 + sum(1 for o in older if o and id(o[0]) in kept)
    if not adapt or ex.args.hub_round == "as-trained":
        return candidate, samples
    if ex.args.hub_round == "change":  # generation + (candidate - start)
        return rebase(candidate, config, generation, start), samples
    trained, _ = train_round(generation, config, new, replay,
                             replace(policy, l2sp_alpha=ex.args.hub_round_l2sp))
    return trained, samples


def serve_generation(ex: Experiment, sites: dict[str, Site], hub: HubService,
                     rounds: dict[str, MultiHeadNetwork], hub_model: MultiHeadNetwork, r: int,
                     seed: int, adapt: bool) -> MultiHeadNetwork:
    """Every node swaps to the hub's current generation or, adapting, to its own fine-tune
    of it (the generation plus what the site learned on its base); the generation."""
    config, args = ex.init[1], ex.args
    hub.aggregator.process_pending()
    served = current_model(hub, config)
    for i, site in enumerate(sites.values()):
        site.model = served
        if adapt and site.replay:
            start = rebase(served, config, rounds[site.name], hub_model)
            site.model, _ = train_round(
                start, config, replay_within(site.replay, args.replay_max_slices), [],
                replace(ex.policy, epochs=args.adapt_epochs,
                        time_budget_s=args.adapt_time_budget,
                        seed=seed * 1000 + r * 10 + 5 + i))
    return served


def round_row(r: int, dice: dict[str, float], seconds: float, hub: HubService | None,
              diag: dict[str, float], shifted: str) -> dict[str, Any]:
    row: dict[str, Any] = {"round": r, "dice": dice, "seconds": round(seconds, 1)}
    if hub is not None:
        row["generation"] = hub.require_current().number
        row["rejected"] = len(hub.list_rejections(1000))
        gain = diag["candidate"] - diag["served_before"]
        row["shifted_round"] = {**diag, "served_after": dice[shifted],
                                "retained": (dice[shifted] - diag["served_before"])
                                / gain if abs(gain) > 1e-3 else None}
    return row


def round_line(seed: int, arm: str, row: dict[str, Any], shifted: str, federated: bool) -> str:
    dice = row["dice"]
    return (f"seed {seed} {arm:>8} round {row['round']:>2}: " + " ".join(
        f"{k} {v:.3f}" for k, v in dice.items() if v == v)
        + (f" | gen {row['generation']}, {shifted}'s round "
           f"{row['shifted_round']['served_before']:.3f} -> "
           f"{row['shifted_round']['candidate']:.3f}, served "
           f"{dice[shifted]:.3f}" if federated else "")
        + f" ({row['seconds']:.0f} s)")


def run_arm(arm: str, ex: Experiment, seed: int) -> dict[str, Any]:
    """``args.generations`` rounds of one arm; Dice per site (and union) after each.

    An arm ``<strategy>+adapt`` runs ``<strategy>`` at the hub, and every site then
    serves its own fine-tune of each generation on its replay buffer, as a node with
    ``[federation] adapt`` does (``pipeline.site_adaptation``: ``--adapt-epochs``,
    ``--adapt-time-budget``); ``union`` is then the hub's shared model."""
    model0, config = ex.init
    args = ex.args
    sites = {s: Site(s, model0, config, moments={} if args.keep_optimiser_state else None)
             for s in SITES}
    rows: list[dict[str, Any]] = [{"round": 0, "generation": 0, "dice": arm_scores(
        arm, config, ex.held, {s: model0 for s in SITES}, last=False)}]
    with tempfile.TemporaryDirectory(prefix="tessera-fl-") as tmp:
        hub = None if arm == "local" else hub_for(
            Path(tmp) / "hub", arm.removesuffix(ADAPT), ex.init,
            UnionEvaluator(config, ex.validation) if ex.validation else None,
            args.aggregation)
        try:
            nodes = {} if hub is None else {s: enrol(hub, s) for s in SITES}
            hub_model = model0  # the generation the sites' models descend from
            for r in range(1, args.generations + 1):
                t0 = time.monotonic()
                diag: dict[str, float] = {}
                rounds = train_sites(ex, sites, hub, nodes, r, seed, rows[-1]["dice"], diag,
                                     arm.endswith(ADAPT))
                served = None
                if hub is not None:
                    served = serve_generation(ex, sites, hub, rounds, hub_model, r, seed,
                                              arm.endswith(ADAPT))
                    hub_model = served
                dice = arm_scores(arm, config, ex.held, {s: sites[s].model for s in SITES},
                                  last=r == args.generations, shared=served)
                rows.append(round_row(r, dice, time.monotonic() - t0, hub, diag,
                                      args.shifted_site))
                ex.log(round_line(seed, arm, rows[-1], args.shifted_site, hub is not None))
        finally:
            if hub is not None:
                hub.close()
    return {"rows": rows}


def merged_by(strategy: str, init: tuple[MultiHeadNetwork, ModelConfig],
              updates: dict[str, tuple[bytes, list[str]]]) -> tuple[MultiHeadNetwork, int]:
    """``strategy``'s real hub merging ``updates`` as they arrive (all from generation 0):
    the model it then serves and that generation's number."""
    with tempfile.TemporaryDirectory(prefix="tessera-fl-diag-") as tmp:
        hub = hub_for(Path(tmp) / "hub", strategy, init, None)
        try:
            for s in SITES:
                upload(hub, enrol(hub, s), updates[s][0], updates[s][1], 0)
                if hub.strategy.batch_size() == 1:
                    hub.aggregator.process_pending()
            hub.aggregator.process_pending()
            return current_model(hub, init[1]), hub.require_current().number
        finally:
            hub.close()


def diagnose(ex: Experiment) -> dict[str, Any]:
    """One round from the starter at every site (the same three updates), then each
    strategy's real hub merging them as they arrive (A, B, C, all from generation 0,
    ``num_samples = 1`` as a node declares one correction): how much of the shifted
    site's own gain does the generation it then serves keep?"""
    model0, config = ex.init
    args, held = ex.args, ex.held
    c = args.shifted_site
    updates = {}
    out: dict[str, Any] = {"starter": {s: score(model0, config, held[s]) for s in (c, "A")}}
    for i, s in enumerate(SITES):
        site = Site(s, model0, config, moments={} if args.keep_optimiser_state else None)
        candidate, groups = correct_and_train(site, ex.data(s, 0, args.data_seed),
                                              replace(ex.policy, seed=10 + i), args)
        updates[s] = (update_artifact(candidate, groups, {"site": s})[0], groups)
        if s == c:
            out["local_round"] = {c: score(candidate, config, held[c])}
    ex.log(f"diagnosis: starter {out['starter']}, {c}'s own round {out['local_round']}")
    for arm in [a for a in ARMS if a != "local" and not a.endswith(ADAPT)]:
        merged, generation = merged_by(arm, ex.init, updates)
        dice = {s: score(merged, config, held[s]) for s in (c, "A")}
        gain = out["local_round"][c] - out["starter"][c]
        out[arm] = {**dice, "generation": generation,
                    "retained": (dice[c] - out["starter"][c]) / gain if gain else None}
        ex.log(f"diagnosis {arm:>8}: generation {generation}, {c} {dice[c]:.4f}, "
               f"A {dice['A']:.4f}, retained {out[arm]['retained']}")
    return out
