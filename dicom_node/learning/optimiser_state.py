"""Adam's moments kept by a node from one round of training to the next.

A round builds a fresh optimiser. A fresh Adam has no estimate of each weight's
gradient scale, so its first steps move every weight by about the learning rate
whatever its gradient (bias-corrected ``m / sqrt(v)`` of one sample is ``±1``). With
rounds of a few dozen steps, as in federated learning, a large share of all steps are
such steps. On the MR partial-labels benchmark, 30 rounds of one epoch at a single site
lost 0.010 Dice against one 30-epoch run (the same steps), and the federated
cerebellum 0.015 against site A alone; keeping the moments closed both
(``benchmarks/partial_labels.py``). Federated frameworks do the same: a client's
optimiser lives across rounds while the weights come from the server.

The moments are keyed by parameter *name* (``encoder.down.0.0.weight``), not by the
optimiser's position index, so a round that trains other heads than the last one, a
head added since, or a new generation from the hub with the same architecture, all
reuse what matches and start the rest afresh. They never leave the node: they are
statistics of local gradients, so they stay with the local data.

Stored as safetensors (``tessera-optimiser/1``): per parameter ``<name>::step``,
``<name>::exp_avg``, ``<name>::exp_avg_sq``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from dicom_node.learning.errors import WeightsError
from dicom_node.learning.safetensors_io import read_metadata
from dicom_node.store.durable import write_atomic
from dicom_node.store.private import private_dir

LOGGER = logging.getLogger(__name__)

FORMAT = "tessera-optimiser/1"
KEYS = ("step", "exp_avg", "exp_avg_sq")
SEP = "::"

OptimiserState = dict[str, torch.Tensor]


def capture(model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> OptimiserState:
    """The optimiser's per-parameter state, keyed ``<parameter name>::<key>`` (CPU)."""
    out: OptimiserState = {}
    for name, param in model.named_parameters():
        state = optimiser.state.get(param)
        if not state or any(k not in state for k in KEYS):
            continue
        for key in KEYS:
            value = state[key]
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            out[f"{name}{SEP}{key}"] = value.detach().to("cpu", torch.float32).clone()
    return out


def restore(model: torch.nn.Module, optimiser: torch.optim.Optimizer,
            saved: Mapping[str, torch.Tensor]) -> int:
    """Seed ``optimiser`` with ``saved`` for the parameters it optimises; returns how many.

    A parameter whose moments are missing, incomplete, of another shape or not finite
    starts afresh (it is logged once, not an error: it only costs a warm-up).
    """
    optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
    restored, skipped = 0, []
    for name, param in model.named_parameters():
        if id(param) not in optimised:
            continue
        entry = {k: saved.get(f"{name}{SEP}{k}") for k in KEYS}
        if all(v is None for v in entry.values()):
            continue
        step, avg, avg_sq = entry["step"], entry["exp_avg"], entry["exp_avg_sq"]
        if (step is None or avg is None or avg_sq is None or step.numel() != 1
                or avg.shape != param.shape or avg_sq.shape != param.shape
                or not bool(torch.isfinite(avg).all()) or not bool(torch.isfinite(avg_sq).all())
                or bool((avg_sq < 0).any()) or float(step) < 1):
            skipped.append(name)
            continue
        optimiser.state[param] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": avg.to(param.device, param.dtype).clone(),
            "exp_avg_sq": avg_sq.to(param.device, param.dtype).clone(),
        }
        restored += 1
    if skipped:
        LOGGER.warning("optimiser state of %d parameters does not fit (e.g. %s); they "
                       "start afresh", len(skipped), skipped[0])
    return restored


def to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
             ) -> bytes:
    return torch_save({k: v.contiguous() for k, v in state.items()},
                      metadata={"format": FORMAT, **(metadata or {})})


def from_bytes(data: bytes) -> OptimiserState:
    """Parse a stored state; :class:`ValueError` if it is not one."""

    try:
        fmt = read_metadata(data).get("format")  # refuses pickles before anything parses
        tensors = torch_load(data)
    except (WeightsError, SafetensorError) as exc:
        raise ValueError(str(exc)) from exc
    if fmt != FORMAT:
        raise ValueError(f"format {fmt!r}, expected {FORMAT!r}")
    bad = [k for k in tensors if SEP not in k or k.rsplit(SEP, 1)[1] not in KEYS]
    if bad:
        raise ValueError(f"unexpected entries, e.g. {bad[0]!r}")
    return {k: v.float() for k, v in tensors.items()}


def save(path: Path, state: Mapping[str, torch.Tensor],
         metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically (a crash leaves the previous state or none, never half a file)."""
    private_dir(path.parent)
    # Not durable: the moments are only a head start, and an unreadable file loads empty.
    write_atomic(path, to_bytes(state, metadata), durable=False)


def load(path: Path) -> OptimiserState:
    """The state at ``path``; empty (with a warning) if there is none or it is unreadable:
    a lost state costs a warm-up, never a round."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        LOGGER.warning("optimiser state %s unreadable (%s); starting afresh", path, exc)
        return {}
    try:
        return from_bytes(data)
    except ValueError as exc:
        LOGGER.warning("optimiser state %s ignored (%s); starting afresh", path, exc)
        return {}
