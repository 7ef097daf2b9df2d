"""Training on 2D slices with a masked (marginal) loss, per-head, within a time budget.

Partial labels: every sample says which labels are annotated. Within a head, labels
that a sample does not annotate are merged with background (marginal loss: the
probability of "background or an unannotated label" is what is scored), and a head
whose labels a sample does not annotate at all gets no loss and no gradient from it.
A head is only run when it is trained, so a hospital annotating the liver updates the
encoder and ``heads.liver`` only. Continual classes: ``freeze_encoder`` plus ``heads``.

Augmentation is a small random affine (rotation, scale, shift) plus intensity scale,
shift and noise. There is no flipping: left and right kidney are lateral labels.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.learning.errors import TrainingError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadUNet
from dicom_node.learning.optimiser_state import OptimiserState
from dicom_node.learning.optimiser_state import capture as capture_optimiser
from dicom_node.learning.optimiser_state import restore as restore_optimiser
from dicom_node.learning.preprocessing import intensity_range, normalise, resize_images
from dicom_node.learning.preprocessing import resize_labels as _resize_labels

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPolicy:
    """How a round of training runs (Dafne: 5 epochs of Adam at 1e-3).

    ``heads`` limits training to those heads (``None``: every head whose labels the
    samples annotate); ``freeze_encoder`` trains heads only (continual classes).
    ``replay_fraction`` of each batch is drawn from the replay samples.
    ``time_budget_s`` stops training at the first step boundary past it; with
    ``lr_schedule="cosine"`` the rate decays over steps or budget, whichever ends first.
    ``num_threads=None`` lets a :class:`ThreadTuner` pick 1 or all threads on CPU.

    Against forgetting what the model knew before the round (a node only has its own
    corrections, never the data the model came from): ``l2sp_alpha`` adds the L2-SP
    penalty ``alpha/2 * ||w - w0||^2`` toward the weights the round started from, on
    every trained parameter (Li et al. 2018, "Explicit inductive bias for transfer
    learning"); ``encoder_lr_scale`` multiplies the encoder's learning rate (heads keep
    ``learning_rate``). ``distill_weight`` adds learning without forgetting (Li & Hoiem
    2016): a KL term keeping the trained heads' softmax close to the round's starting
    model on the voxels where that model already agreed with the labels (what the
    correction did not change). 0, 0 and 1 turn them off.

    Against a shared encoder drifting away from heads a site does not train (partial
    labels across sites): ``distill_other_heads`` adds conditional distillation
    (ConDistFL, Wang et al. 2024): every active head this round does not train stays
    frozen, and on the voxels where the trained heads' labels say background, its
    softmax is kept close to the round's starting model by a KL term whose gradient
    reaches only the encoder. 0 turns it off; it does nothing with ``freeze_encoder``.

    ``anchor_fraction`` of each batch is drawn from the ``anchors`` passed to
    :func:`train` (rehearsal: slices like the data the model came from, with their
    labels, see :mod:`dicom_node.learning.rehearsal`); replay, anchors and new
    samples share the batch, and every batch keeps at least one new sample.
    """

    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    augment: bool = True
    time_budget_s: float | None = None
    replay_fraction: float = 0.0
    device: str = "cpu"
    freeze_encoder: bool = False
    heads: tuple[str, ...] | None = None
    lr_schedule: str = "constant"
    dice_weight: float = 1.0
    num_threads: int | None = None
    seed: int = 0
    l2sp_alpha: float = 0.0
    encoder_lr_scale: float = 1.0
    distill_weight: float = 0.0
    distill_other_heads: float = 0.0
    anchor_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch_size must be >= 1")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise TrainingError("replay_fraction must be in [0, 1)")
        if not 0.0 <= self.anchor_fraction < 1.0:
            raise TrainingError("anchor_fraction must be in [0, 1)")
        if self.replay_fraction + self.anchor_fraction >= 1.0:
            raise TrainingError("replay_fraction + anchor_fraction must be < 1 "
                                "(a batch needs new samples)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError("lr_schedule must be 'constant' or 'cosine'")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise TrainingError("time_budget_s must be positive")
        if self.l2sp_alpha < 0:
            raise TrainingError("l2sp_alpha must be >= 0")
        if self.distill_weight < 0:
            raise TrainingError("distill_weight must be >= 0")
        if self.distill_other_heads < 0:
            raise TrainingError("distill_other_heads must be >= 0")
        if self.encoder_lr_scale <= 0:
            raise TrainingError("encoder_lr_scale must be positive")


@dataclass(frozen=True)
class SliceSample:
    """One training slice: raw intensities (HU for CT), its label map, what is annotated.

    ``labels`` holds label values (see ``ModelConfig.labels``); ``annotated`` names the
    labels whose voxels are all marked, so any other voxel is known not to be them.
    ``mr_range`` is the volume's percentile range for MR (``None`` for CT).
    """

    image: np.ndarray
    labels: np.ndarray
    annotated: frozenset[str]
    mr_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    elapsed_s: float


@dataclass(frozen=True)
class TrainingReport:
    steps: int
    epochs_completed: int
    samples: int
    seconds: float
    stopped_by_time_budget: bool
    epoch_losses: tuple[float, ...]
    trained_heads: tuple[str, ...]
    encoder_frozen: bool
    # Adam's moments after the round (see optimiser_state); only when train() was
    # given a state to continue from ({} for a first round)
    optimiser_state: OptimiserState | None = field(default=None, repr=False, compare=False)


ProgressHook = Callable[[TrainingProgress], None]


def samples_from_volume(
    volume: np.ndarray,
    labels: np.ndarray,
    annotated: Iterable[str],
    config: ModelConfig,
    slices: Iterable[int] | None = None,
) -> list[SliceSample]:
    """Cut a volume and its label map into slice samples (all slices by default)."""
    if volume.shape != labels.shape:
        raise TrainingError(f"volume {volume.shape} and labels {labels.shape} differ")
    mr_range = intensity_range(volume, config.preprocessing)
    names = frozenset(annotated)
    unknown = names - set(config.label_values)
    if unknown:
        raise TrainingError(f"annotated labels {sorted(unknown)} are not in model {config.name}")
    idx = range(volume.shape[0]) if slices is None else slices
    return [
        SliceSample(volume[i].astype(np.float32), labels[i].astype(np.uint8), names, mr_range)
        for i in idx
    ]


@dataclass
class PreparedSlices:
    """Samples at model resolution: normalised images, label maps, annotation masks."""

    images: torch.Tensor  # (N, C, S, S) float16
    labels: torch.Tensor  # (N, S, S) uint8
    annotated: torch.Tensor  # (N, L) bool, L in config.labels order

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def prepare_samples(samples: Sequence[SliceSample], config: ModelConfig) -> PreparedSlices:
    pp = config.preprocessing
    size = (pp.input_size, pp.input_size)
    names = [lab.name for lab in config.labels]
    images, labels = [], []
    start = 0
    while start < len(samples):  # resample runs of same-shaped slices together
        shape, rng = samples[start].image.shape, samples[start].mr_range
        stop = start
        while (
            stop < len(samples)
            and samples[stop].image.shape == shape
            and samples[stop].mr_range == rng
            and stop - start < 256
        ):
            stop += 1
        chunk = samples[start:stop]
        x = torch.from_numpy(np.stack([s.image for s in chunk]).astype(np.float32))[:, None]
        images.append(normalise(resize_images(x, size), pp, rng).half())
        y = torch.from_numpy(np.stack([s.labels for s in chunk]).astype(np.uint8))
        labels.append(_resize_labels(y, size))
        start = stop
    annotated = torch.tensor(
        [[n in s.annotated for n in names] for s in samples], dtype=torch.bool
    ).reshape(len(samples), len(names))
    return PreparedSlices(torch.cat(images), torch.cat(labels), annotated)


def head_targets(
    labels: torch.Tensor, annotated: torch.Tensor, config: ModelConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per head: ``(target (N, H, W) long in 0..K, annotated (N, K) bool)``.

    An enclosing label's target is every labelled voxel; unannotated labels map to 0.
    """
    index = {lab.name: i for i, lab in enumerate(config.labels)}
    out = {}
    for head in config.heads:
        target = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)
        ann = annotated[:, [index[n] for n in head.labels]]
        for j, name in enumerate(head.labels, start=1):
            spec = config.label(name)
            hit = labels != 0 if spec.enclosing else labels == spec.value
            target = torch.where(hit & ann[:, j - 1, None, None], j, target)
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
        bias = torch.where(merged, 0.0, -torch.inf).to(logp.dtype)[:, :, None, None]
        log_bg = torch.logsumexp(logp + bias, dim=1)
        nll = torch.where(target > 0, -logp.gather(1, target[:, None])[:, 0], -log_bg)
        w = weight.to(logp.dtype)
        loss = (nll.mean(dim=(1, 2)) * w).sum() / w.sum()
        if dice_weight:
            prob = logp[:, 1:].exp()
            onehot = F.one_hot(target, logp.shape[1])[..., 1:].permute(0, 3, 1, 2).to(prob.dtype)
            m = ann.to(prob.dtype)[:, :, None, None]
            inter = (prob * onehot * m).sum(dim=(0, 2, 3))
            denom = ((prob + onehot) * m).sum(dim=(0, 2, 3))
            present = ann.any(dim=0)
            dice = (2 * inter + 1.0) / (denom + 1.0)
            loss = loss + dice_weight * (1 - dice[present]).mean()
        total = loss if total is None else total + loss
    return total


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


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random affine + intensity changes; never mirrors (lateral labels)."""
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-0.17, 0.17)  # about +-10 degrees
    scale_x, scale_y = uniform(0.88, 1.12), uniform(0.88, 1.12)
    shift_x, shift_y = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * scale_x, -sin * scale_x, shift_x], dim=1),
            torch.stack([sin * scale_y, cos * scale_y, shift_y], dim=1),
        ],
        dim=1,
    ).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding so that outside the slice reads -1 (air)
    images = (
        F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        - 1
    )
    labels = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].to(labels.dtype)
    gain = uniform(0.9, 1.1).to(images.device)[:, None, None, None]
    offset = uniform(-0.08, 0.08).to(images.device)[:, None, None, None]
    sigma = uniform(0.0, 0.05).to(images.device)[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    images = ((images + 1) * gain - 1 + offset + sigma * noise).clamp_(-1, 1)
    return images, labels


def train(
    model: MultiHeadUNet,
    config: ModelConfig,
    samples: Sequence[SliceSample] | PreparedSlices,
    policy: TrainingPolicy,
    *,
    replay: Sequence[SliceSample] | PreparedSlices = (),
    anchors: Sequence[SliceSample] | PreparedSlices = (),
    progress: ProgressHook | None = None,
    optimiser_state: Mapping[str, torch.Tensor] | None = None,
) -> TrainingReport:
    """Train ``model`` in place on ``samples`` (plus ``replay`` and ``anchors``).

    ``optimiser_state`` (from the previous round's report, ``{}`` for a first round)
    seeds Adam's moments of the parameters it fits, and the report then carries the
    moments after this round (:mod:`dicom_node.learning.optimiser_state`); ``None``
    starts afresh and keeps nothing.
    """
    data = samples if isinstance(samples, PreparedSlices) else prepare_samples(samples, config)
    old = _prepared(replay, config)
    anc = _prepared(anchors, config)
    if len(data) == 0:
        raise TrainingError("no training samples")
    heads = _heads_to_train(config, data, policy)
    device = torch.device(policy.device)
    threads_before = torch.get_num_threads()
    tuner = ThreadTuner(threads_before) if device.type == "cpu" and not policy.num_threads else None
    if policy.num_threads:
        torch.set_num_threads(policy.num_threads)
    origin = next(model.parameters()).device
    model.to(device).train()
    params = [p for h in heads for p in model.heads[h].parameters()]
    groups: list[dict] = [{"params": params, "lr_scale": 1.0}]
    if policy.freeze_encoder:
        model.encoder.requires_grad_(False)
    else:
        groups.append({"params": list(model.encoder.parameters()),
                       "lr_scale": policy.encoder_lr_scale})
    for group in groups:
        group["lr"] = policy.learning_rate * group["lr_scale"]
    optimiser = torch.optim.Adam(groups, lr=policy.learning_rate,
                                 weight_decay=policy.weight_decay)
    if optimiser_state:
        restored = restore_optimiser(model, optimiser, optimiser_state)
        LOGGER.info("optimiser state continued for %d parameter tensors", restored)
    others = [] if policy.freeze_encoder or not policy.distill_other_heads else [
        h for h in config.active_head_names if h not in heads]
    for name in others:  # frozen: only the encoder learns from their distillation
        model.heads[name].requires_grad_(False)
    teacher = (copy.deepcopy(model).eval().requires_grad_(False)
               if policy.distill_weight or others else None)
    anchor = (
        [(p, p.detach().clone()) for g in groups for p in g["params"]]
        if policy.l2sp_alpha > 0 else []
    )
    gen = torch.Generator().manual_seed(policy.seed)
    n_anchor = round(policy.batch_size * policy.anchor_fraction) if anc is not None else 0
    n_anchor = min(n_anchor, policy.batch_size - 1)  # every batch keeps a new sample
    n_replay = round(policy.batch_size * policy.replay_fraction) if old is not None else 0
    n_replay = min(n_replay, policy.batch_size - 1 - n_anchor)
    n_new = policy.batch_size - n_replay - n_anchor
    steps_per_epoch = math.ceil(len(data) / n_new)
    total_steps = steps_per_epoch * policy.epochs
    step, stopped, completed, epoch_losses = 0, False, 0, []
    t0 = time.monotonic()
    try:
        for epoch in range(policy.epochs):
            order = torch.randperm(len(data), generator=gen)
            running, count = 0.0, 0
            for b in range(steps_per_epoch):
                elapsed = time.monotonic() - t0
                if policy.time_budget_s is not None and elapsed >= policy.time_budget_s:
                    stopped = True
                    break
                idx = order[b * n_new : (b + 1) * n_new]
                x, y, ann = data.images[idx], data.labels[idx], data.annotated[idx]
                if n_replay and old is not None:
                    r = torch.randint(len(old), (n_replay,), generator=gen)
                    x = torch.cat([x, old.images[r]])
                    y = torch.cat([y, old.labels[r]])
                    ann = torch.cat([ann, old.annotated[r]])
                if n_anchor and anc is not None:
                    r = torch.randint(len(anc), (n_anchor,), generator=gen)
                    x = torch.cat([x, anc.images[r]])
                    y = torch.cat([y, anc.labels[r]])
                    ann = torch.cat([ann, anc.annotated[r]])
                x = x.float()
                if policy.augment:
                    x, y = augment_batch(x, y, gen)
                x, y, ann = x.to(device), y.to(device), ann.to(device)
                _set_lr(optimiser, policy, step, total_steps, elapsed)
                if tuner is not None:
                    tuner.before_step(step)
                t_step = time.monotonic()
                loss = _step(model, config, heads, x, y, ann, policy, optimiser, anchor,
                             teacher, others)
                if tuner is not None:
                    tuner.after_step(time.monotonic() - t_step)
                step += 1
                if loss is not None:
                    running, count = running + loss, count + 1
                if progress is not None:
                    progress(
                        TrainingProgress(
                            step,
                            total_steps,
                            epoch + 1,
                            policy.epochs,
                            running / max(count, 1),
                            time.monotonic() - t0,
                        )
                    )
            if count:
                epoch_losses.append(running / count)
                LOGGER.info("epoch %d/%d loss %.4f", epoch + 1, policy.epochs, running / count)
            if not stopped:
                completed += 1
            else:
                LOGGER.info("time budget %.0f s reached after %d steps", policy.time_budget_s, step)
                break
    finally:
        model.encoder.requires_grad_(True)
        for name in others:
            model.heads[name].requires_grad_(True)
        model.to(origin).eval()
        torch.set_num_threads(threads_before)
    return TrainingReport(
        steps=step,
        epochs_completed=completed,
        samples=len(data),
        seconds=time.monotonic() - t0,
        stopped_by_time_budget=stopped,
        epoch_losses=tuple(epoch_losses),
        trained_heads=tuple(heads),
        encoder_frozen=policy.freeze_encoder,
        optimiser_state=None if optimiser_state is None else capture_optimiser(model, optimiser),
    )


def _prepared(
    samples: Sequence[SliceSample] | PreparedSlices, config: ModelConfig
) -> PreparedSlices | None:
    if isinstance(samples, PreparedSlices):
        return samples if len(samples) else None
    return prepare_samples(samples, config) if len(samples) else None


class ThreadTuner:
    """Picks the intra-op thread count that trains fastest right now, and keeps checking.

    On shared cores, one thread can beat all of them (other processes hold the rest);
    on an idle machine all threads win. Steps alternate between one thread and
    ``max_threads`` at the start and for a few steps every ``recheck`` steps; the
    faster median wins. Costs nothing when there is a single core.
    """

    def __init__(self, max_threads: int, probe: int = 3, recheck: int = 100) -> None:
        self.options = sorted({1, max(1, max_threads)})
        self.probe, self.recheck = probe, recheck
        self.times: dict[int, list[float]] = {n: [] for n in self.options}
        self.current = self.options[-1]
        self._probing = len(self.options) > 1

    def before_step(self, step: int) -> None:
        if len(self.options) == 1:
            return
        if step and step % self.recheck == 0:
            self.times = {n: [] for n in self.options}
            self._probing = True
        if self._probing:
            self.current = self.options[step % len(self.options)]
        torch.set_num_threads(self.current)

    def after_step(self, seconds: float) -> None:
        if not self._probing:
            return
        self.times[self.current].append(seconds)
        if all(len(t) > self.probe for t in self.times.values()):
            # the first sample of each is a warm-up (allocations, thread start)
            medians = {n: float(np.median(t[1:])) for n, t in self.times.items()}
            best = min(medians, key=lambda n: medians[n])
            if best != self.current or self._probing:
                LOGGER.info("training with %d thread(s): step medians %s", best, medians)
            self.current, self._probing = best, False
            torch.set_num_threads(best)


def _heads_to_train(config: ModelConfig, data: PreparedSlices, policy: TrainingPolicy) -> list[str]:
    names = [lab.name for lab in config.labels]
    annotated = {names[i] for i in torch.nonzero(data.annotated.any(dim=0)).flatten().tolist()}
    useful = [h.name for h in config.heads if annotated & set(h.labels)]
    if policy.heads is not None:
        unknown = set(policy.heads) - set(config.head_names)
        if unknown:
            raise TrainingError(f"policy.heads: unknown heads {sorted(unknown)}")
        useful = [h for h in useful if h in policy.heads]
    if not useful:
        raise TrainingError("the samples annotate no label of the heads to train")
    return useful


def _set_lr(
    optimiser: torch.optim.Optimizer, policy: TrainingPolicy, step: int, total: int, elapsed: float
) -> None:
    if policy.lr_schedule == "constant":
        return
    frac = step / max(total, 1)
    if policy.time_budget_s:
        frac = max(frac, elapsed / policy.time_budget_s)
    lr = policy.learning_rate * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    for group in optimiser.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _step(
    model: MultiHeadUNet,
    config: ModelConfig,
    heads: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    ann: torch.Tensor,
    policy: TrainingPolicy,
    optimiser: torch.optim.Optimizer,
    anchor: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    teacher: MultiHeadUNet | None = None,
    others: Sequence[str] = (),
) -> float | None:
    targets = head_targets(y, ann, config)
    with torch.set_grad_enabled(not policy.freeze_encoder):
        features = model.encoder(x)
    logits = {h: model.heads[h](features) for h in heads}
    loss = masked_loss(logits, targets, policy.dice_weight)
    if loss is None:  # this batch annotates nothing the trained heads own
        return None
    if teacher is not None:
        with torch.no_grad():
            old = teacher(x, [*(heads if policy.distill_weight else []), *others])
        if policy.distill_weight:
            loss = loss + policy.distill_weight * distillation_loss(logits, old, targets)
        if others:
            background = torch.stack([targets[h][0] == 0 for h in heads]).all(dim=0)
            student = {h: model.heads[h](features) for h in others}
            loss = loss + policy.distill_other_heads * conditional_distillation_loss(
                student, old, background)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():  # L2-SP: the gradient of alpha/2 * ||w - w0||^2 is alpha * (w - w0)
        for p, p0 in anchor:
            if p.grad is not None:
                p.grad.add_(p - p0, alpha=policy.l2sp_alpha)
    optimiser.step()
    return float(loss.detach())
