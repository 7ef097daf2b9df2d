"""The verdict of federated evaluation on a candidate: wait, accept or refuse, and why.

Pure logic over the nodes' answers (see ``evaluations`` for how they arrive and
``aggregator`` for what is done with the verdict):

* **When.** A candidate waits until every node taking part (an *evaluator*: it asked for
  tasks within ``[gate] evaluator_window_s``) has answered and at least
  ``min_evaluations`` answers are in, or until the deadline.
* **Harm to one site.** Any site whose held-out score drops by more than
  ``validation_margin`` refuses the candidate, named with its figures; a site with fewer
  than ``min_site_cases`` cases is noted as too small to judge.
* **The mean.** With at least ``min_evaluations`` sites that scored it, the case-weighted
  mean must not fall below the reference by more than the margin.
* **Not judged.** With fewer (nodes without held-out cases answer with none; silent
  nodes do not answer), the candidate is published with a note saying so
  (``[gate] unjudged = "accept"``) or refused with that reason (``"reject"``). Nothing
  passes silently: the note is kept on the generation (``tessera hub models``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from federation_grpc.hub.config import GateConfig
from federation_grpc.hub.gate import SiteScore, compare_scores, paired_mean, site_reasons


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    score: float | None  # the case-weighted mean of the sites that scored it
    reasons: list[str] = field(default_factory=list)  # why it is refused
    notes: list[str] = field(default_factory=list)  # said of it either way


def waiting(answers: Sequence[SiteScore], evaluators: Collection[str], deadline_passed: bool,
            gate: GateConfig) -> bool:
    """Whether the candidate still waits for answers."""
    if deadline_passed:
        return False
    answered = {a.node_id for a in answers}
    return len(answers) < gate.min_evaluations or not set(evaluators) <= answered


def judge(answers: Sequence[SiteScore], evaluators: Collection[str],
          gate: GateConfig) -> Verdict:
    """The verdict from the answers in (``evaluators``: the nodes still expected)."""
    scored = [a for a in answers if a.num_cases > 0]
    harm, notes = site_reasons(scored, gate.validation_margin, gate.min_site_cases)
    reasons: list[str] = []
    score: float | None = None
    if scored:
        score, reference = paired_mean([a.candidate for a in scored],
                                       [a.reference for a in scored],
                                       [a.num_cases for a in scored])
    if len(scored) >= gate.min_evaluations and score is not None:
        reasons += compare_scores(score, reference, gate.validation_margin)
    else:
        unjudged = _unjudged(answers, evaluators, len(scored), gate.min_evaluations)
        if gate.unjudged == "reject":
            reasons.append(unjudged)
        else:
            notes.insert(0, unjudged)
    reasons += harm
    if reasons:
        return Verdict(False, score, reasons + notes, notes)
    return Verdict(True, score, [], notes)


def _unjudged(answers: Sequence[SiteScore], evaluators: Collection[str], scored: int,
              needed: int) -> str:
    without = sorted(a.node_id for a in answers if a.num_cases == 0)
    silent = sorted(set(evaluators) - {a.node_id for a in answers})
    parts = [f"not judged: federated evaluation got {scored} of {needed} results scored on "
             "held-out cases before the deadline" if silent or len(answers) < needed else
             f"not judged: {scored} of the {needed} sites needed scored it on held-out cases"]
    if without:
        parts.append(f"no held-out cases at {', '.join(without[:10])}")
    if silent:
        parts.append(f"no answer from {', '.join(silent[:10])}")
    return "; ".join(parts)
