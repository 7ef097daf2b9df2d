"""What a training step minimises: the masked loss for partial labels, and the terms
against forgetting (distillation toward the round's starting model, L2-SP).

Partial labels: every sample says which labels are annotated. Within a head, labels
that a sample does not annotate are merged with background (marginal loss: the
probability of "background or an unannotated label" is what is scored), and a head
whose labels a sample does not annotate at all gets no loss and no gradient from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dicom_node.learning.model_config import ModelConfig


def head_targets(
    labels: torch.Tensor, annotated: torch.Tensor, config: ModelConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per head: ``(target (N, *spatial) long in 0..K, annotated (N, K) bool)``.

    An enclosing label's target is every labelled voxel; unannotated labels map to 0.
    """
    index = {lab.name: i for i, lab in enumerate(config.labels)}
    spatial = (1,) * (labels.dim() - 1)
    out = {}
    for head in config.heads:
        target = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)
        ann = annotated[:, [index[n] for n in head.labels]]
        for j, name in enumerate(head.labels, start=1):
            spec = config.label(name)
            hit = labels != 0 if spec.enclosing else labels == spec.value
            target = torch.where(hit & ann[:, j - 1].view(-1, *spatial), j, target)
        out[head.name] = (target, ann)
    return out


def masked_loss(
    logits: dict[str, torch.Tensor],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dice_weight: float = 1.0,
) -> torch.Tensor | None:
    """Marginal cross-entropy plus soft Dice over annotated labels; ``None`` if nothing is.

    Samples that annotate none of a head's labels contribute nothing to it.
    """
    total: torch.Tensor | None = None
    for name, z in logits.items():
        target, ann = targets[name]
        weight = ann.any(dim=1)
        if not bool(weight.any()):
            continue
        logp = F.log_softmax(z.float(), dim=1)
        # log P(background or an unannotated label of this head)
        merged = torch.cat([torch.ones_like(ann[:, :1]), ~ann], dim=1)
        bias = _per_voxel(torch.where(merged, 0.0, -torch.inf).to(logp.dtype), logp)
        log_bg = torch.logsumexp(logp + bias, dim=1)
        nll = torch.where(target > 0, -logp.gather(1, target[:, None])[:, 0], -log_bg)
        w = weight.to(logp.dtype)
        loss = (nll.flatten(1).mean(dim=1) * w).sum() / w.sum()
        if dice_weight:
            loss = loss + dice_weight * _soft_dice_loss(logp, target, ann)
        total = loss if total is None else total + loss
    return total


def _per_voxel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` values viewed to broadcast over ``like``'s ``(N, K, *spatial)``."""
    return values.view(*values.shape, *(1,) * (like.dim() - 2))


def _soft_dice_loss(logp: torch.Tensor, target: torch.Tensor, ann: torch.Tensor) -> torch.Tensor:
    """``1 - Dice`` of a head's labels, mean over the labels some sample annotates."""
    prob = logp[:, 1:].exp()
    onehot = F.one_hot(target, logp.shape[1])[..., 1:].movedim(-1, 1).to(prob.dtype)
    m = _per_voxel(ann.to(prob.dtype), prob)
    dims = (0, *range(2, prob.dim()))
    inter = (prob * onehot * m).sum(dim=dims)
    denom = ((prob + onehot) * m).sum(dim=dims)
    present = ann.any(dim=0)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return (1 - dice[present]).mean()


def distillation_loss(
    logits: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """KL(teacher || student) per voxel, mean over voxels where the teacher was right.

    "Right": the teacher's argmax is the target, or the target is background and the
    argmax a label the sample does not annotate (nothing is known against it).
    """
    total = torch.zeros(())
    for name, z in logits.items():
        target, ann = targets[name]
        t = teacher[name].float()
        logp_t = F.log_softmax(t, dim=1)
        pred = t.argmax(dim=1)
        merged = torch.cat([torch.ones_like(ann[:, :1]), ~ann], dim=1)  # (N, K+1)
        unannotated = merged.gather(1, pred.flatten(1)).view_as(pred)
        agree = (pred == target) | ((target == 0) & unannotated)
        kl = (logp_t.exp() * (logp_t - F.log_softmax(z.float(), dim=1))).sum(dim=1)
        m = agree.to(kl.dtype)
        total = total + (kl * m).sum() / m.sum().clamp(min=1.0)
    return total


def conditional_distillation_loss(
    logits: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], where: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) per voxel of each head in ``logits``, mean over ``where``."""
    total = torch.zeros(())
    m = where.to(torch.float32)
    for name, z in logits.items():
        logp_t = F.log_softmax(teacher[name].float(), dim=1)
        kl = (logp_t.exp() * (logp_t - F.log_softmax(z.float(), dim=1))).sum(dim=1)
        total = total + (kl * m).sum() / m.sum().clamp(min=1.0)
    return total


def add_l2sp_gradient(
    anchor: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float
) -> None:
    """Add L2-SP's gradient to each ``(parameter, start value)`` pair's gradient.

    The gradient of ``alpha/2 * ||w - w0||^2`` is ``alpha * (w - w0)``; parameters
    without a gradient this step are left alone.
    """
    with torch.no_grad():
        for p, p0 in anchor:
            if p.grad is not None:
                p.grad.add_(p - p0, alpha=alpha)
