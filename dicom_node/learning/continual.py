"""Continual classes (Continual Segment): a new structure is a new head on the frozen encoder.

The life of an added head, as the node sees it:

1. ``tessera hub add-head`` publishes a generation whose config gains the head, its
   labels and an ``added_heads`` record ``{"init_seed": s, "trained": false}``; the
   generation's tensors are the previous ones unchanged (the hub has no torch and
   does not know the architecture, so it cannot make weights).
2. A node loading that generation builds the head and initialises it from ``s`` with
   numpy (:func:`init_head_arrays`): every node, whatever its torch version, starts
   from bit-identical weights, so updates trained at several sites average
   meaningfully.
3. While the head is *pending* (no trained weights yet) inference does not run it and
   SEG objects do not list its labels: a random decoder never reaches a radiologist.
4. A round whose samples annotate labels of an added head trains only the added heads
   they annotate, with the encoder frozen (:func:`continual_policy`); the old heads
   and the encoder are bit-identical afterwards, so the old structures cannot get
   worse. Samples that do not annotate the new labels give that head no loss (the
   masked loss), so a site that does not annotate the structure never teaches it
   "everything is background".
5. The round's candidate config marks the head trained (:func:`after_round`); the
   hub does the same when it merges the first update carrying the head.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.training import TrainingReport

LOGGER = logging.getLogger(__name__)


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    # One stream per tensor name, so the values do not depend on iteration order.
    return np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))


def init_head_arrays(model: MultiHeadNetwork, head: str, seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial weights of ``heads.<head>`` (float32, keyed by full name).

    Convolutions (and transposed ones) get PyTorch's default scheme, uniform in
    ``±1/sqrt(fan_in)`` for weight and bias; GroupNorm gets weight 1, bias 0. The
    values come from numpy's PCG64 seeded by ``(seed, crc32(name))``, which is stable
    across platforms and library versions, unlike torch's default initialisation.

    Raises
    ------
    ValueError
        The head contains a module kind this function does not know how to initialise.
    """
    out: dict[str, np.ndarray] = {}
    prefix = f"heads.{head}."
    for module_name, module in model.heads[head].named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        full = prefix + (f"{module_name}." if module_name else "")
        if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d):
            shape = tuple(module.weight.shape)
            fan_in = shape[1] * math.prod(shape[2:])
            bound = 1.0 / math.sqrt(fan_in)
            for pname, param in own.items():
                rng = _tensor_rng(seed, full + pname)
                values = rng.random(tuple(param.shape)) * (2 * bound) - bound
                out[full + pname] = values.astype(np.float32)
        elif isinstance(module, nn.GroupNorm):
            out[full + "weight"] = np.ones(tuple(module.weight.shape), np.float32)
            out[full + "bias"] = np.zeros(tuple(module.bias.shape), np.float32)
        else:
            raise ValueError(f"cannot initialise {type(module).__name__} in heads.{head}")
    return out


def pending_init_state(
    model: MultiHeadNetwork, config: ModelConfig, present: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Seeded tensors for every pending head none of whose tensors are in ``present``.

    A pending head whose tensors are present (saved by this node after building it) is
    left alone; an *active* head without tensors is never filled in: the caller's
    strict check reports it, since an active head must have trained weights.
    """
    names = set(present)
    out: dict[str, torch.Tensor] = {}
    for head in config.pending_heads:
        prefix = f"heads.{head}."
        if any(n.startswith(prefix) for n in names):
            continue
        seed = config.added_head(head).init_seed
        for key, array in init_head_arrays(model, head, seed).items():
            out[key] = torch.from_numpy(array)
        LOGGER.info("initialised pending head %s from seed %d", head, seed)
    return out


def continual_policy(
    config: ModelConfig, annotated: Iterable[str], policy: TrainingPolicy
) -> TrainingPolicy:
    """The policy of a round, given the labels its new samples annotate.

    When they annotate labels of added heads, the round trains those heads only, on
    the frozen encoder (old heads untouched); otherwise ``policy`` is returned as is,
    with the added heads excluded (they move only with their own labels, which the
    masked loss guarantees anyway).
    """
    labels = set(annotated)
    added = [h for h in config.continual_heads if labels & set(config.head(h).labels)]
    if added:
        return replace(policy, heads=tuple(added), freeze_encoder=True)
    return policy


def after_round(config: ModelConfig, report: TrainingReport) -> ModelConfig:
    """The candidate's config: pending heads the round trained become active."""
    trained = set(report.trained_heads) & set(config.pending_heads)
    return config.with_trained_heads(trained) if trained else config


def head_groups_changed(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> set[str]:
    """Parameter groups (``encoder``, ``heads.<name>``) whose tensors differ bitwise."""
    changed = set()
    for name, value in after.items():
        if not torch.equal(before[name], value):
            parts = name.split(".")
            changed.add("encoder" if parts[0] == "encoder" else f"heads.{parts[1]}")
    return changed
