"""A round of training: the policy, the step loop within a time budget, the report.

Training runs on 2D slices (:mod:`~dicom_node.learning.slices`), or for heads on a 3D
encoder on windows of whole volumes (:mod:`~dicom_node.learning.volume_windows`), with
a masked (marginal) loss for partial labels (:mod:`~dicom_node.learning.losses`), per
head: a head is only run when it is trained, so a hospital annotating the liver updates
the encoder and ``heads.liver`` only. Continual classes: ``freeze_encoder`` plus
``heads``. Slice batches mix new samples, replay and anchors, augmented
(:mod:`~dicom_node.learning.batches`); volumes come with their replay already among
them, one window per step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dicom_node.learning.batches import BatchSource, plan_batches
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.losses import (
    add_l2sp_gradient,
    conditional_distillation_loss,
    distillation_loss,
    head_targets,
    masked_loss,
)
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.optimiser_state import OptimiserState
from dicom_node.learning.optimiser_state import capture as capture_optimiser
from dicom_node.learning.optimiser_state import restore as restore_optimiser
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import (
    PreparedSlices,
    SliceSample,
    prepare_samples,
    prepared_or_none,
)
from dicom_node.learning.thread_tuning import ThreadTuner
from dicom_node.learning.volume_windows import PreparedVolumes, WindowSource

LOGGER = logging.getLogger(__name__)


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


def train(
    model: MultiHeadNetwork,
    config: ModelConfig,
    samples: Sequence[SliceSample] | PreparedSlices | PreparedVolumes,
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
    starts afresh and keeps nothing. A 3D model takes :class:`PreparedVolumes` (its
    replay among them; no anchors), a 2D one slices.
    """
    if (config.spatial_dims == 3) != isinstance(samples, PreparedVolumes):
        raise TrainingError(f"model {config.name!r} is {config.spatial_dims}D: it trains on "
                            f"{'volumes' if config.spatial_dims == 3 else 'slices'}")
    if isinstance(samples, PreparedVolumes):
        if replay or anchors:
            raise TrainingError("volumes carry their replay among the samples; no anchors")
        data: PreparedSlices | PreparedVolumes = samples
    else:
        data = samples if isinstance(samples, PreparedSlices) else prepare_samples(samples,
                                                                                   config)
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
    opt = _optimisation(model, config, heads, policy, optimiser_state)
    gen = torch.Generator().manual_seed(policy.seed)
    loop = _Round(model, config, heads, policy, opt,
                  _batch_source(config, data, replay, anchors, policy, gen), device, tuner,
                  progress)
    try:
        loop.run()
    finally:
        model.encoder.requires_grad_(True)
        for name in opt.others:
            model.heads[name].requires_grad_(True)
        model.to(origin).eval()
        torch.set_num_threads(threads_before)
    return loop.report(
        None if optimiser_state is None else capture_optimiser(model, opt.optimiser))


def _batch_source(
    config: ModelConfig, data: PreparedSlices | PreparedVolumes,
    replay: Sequence[SliceSample] | PreparedSlices, anchors: Sequence[SliceSample] | PreparedSlices,
    policy: TrainingPolicy, gen: torch.Generator,
) -> BatchSource | WindowSource:
    """Windows of volumes, or batches of slices mixing new samples, replay and anchors."""
    if isinstance(data, PreparedVolumes):
        assert config.preprocessing.volume is not None  # a 3D config has it
        return WindowSource(data, config.preprocessing.volume.roi_size, gen)
    old = prepared_or_none(replay, config)
    anc = prepared_or_none(anchors, config)
    plan = plan_batches(policy.batch_size, policy.replay_fraction, policy.anchor_fraction,
                        len(data), old, anc)
    return BatchSource(data, old, anc, plan, gen, policy.augment)


@dataclass
class _Optimisation:
    """What a round optimises with: Adam over the trained parameter groups, and what
    keeps the model near the round's start (L2-SP anchor, distillation teacher)."""

    optimiser: torch.optim.Optimizer
    anchor: list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, value at the start)
    teacher: MultiHeadNetwork | None
    others: list[str]  # active heads not trained, distilled through the encoder


def _optimisation(
    model: MultiHeadNetwork,
    config: ModelConfig,
    heads: list[str],
    policy: TrainingPolicy,
    optimiser_state: Mapping[str, torch.Tensor] | None,
) -> _Optimisation:
    """Parameter groups (trained heads, then the encoder unless frozen), Adam, and the
    frozen heads, teacher and anchor the policy asks for."""
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
    return _Optimisation(optimiser, anchor, teacher, others)


class _Round:
    """The step loop of one :func:`train` call: epochs, the time budget, progress."""

    def __init__(
        self,
        model: MultiHeadNetwork,
        config: ModelConfig,
        heads: list[str],
        policy: TrainingPolicy,
        opt: _Optimisation,
        source: BatchSource | WindowSource,
        device: torch.device,
        tuner: ThreadTuner | None,
        progress: ProgressHook | None,
    ) -> None:
        self.model, self.config, self.heads, self.policy = model, config, heads, policy
        self.opt, self.source, self.device = opt, source, device
        self.tuner, self.progress = tuner, progress
        self.total_steps = source.plan.steps_per_epoch * policy.epochs
        self.step, self.stopped, self.completed = 0, False, 0
        self.epoch_losses: list[float] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        policy = self.policy
        for epoch in range(policy.epochs):
            running, count = self._epoch(epoch)
            if count:
                self.epoch_losses.append(running / count)
                LOGGER.info("epoch %d/%d loss %.4f", epoch + 1, policy.epochs, running / count)
            if not self.stopped:
                self.completed += 1
            else:
                LOGGER.info("time budget %.0f s reached after %d steps",
                            policy.time_budget_s, self.step)
                break

    def _epoch(self, epoch: int) -> tuple[float, int]:
        """Run one epoch's steps (until the time budget); the summed loss and its count."""
        policy = self.policy
        order = self.source.epoch_order()
        running, count = 0.0, 0
        for b in range(self.source.plan.steps_per_epoch):
            elapsed = time.monotonic() - self.t0
            if policy.time_budget_s is not None and elapsed >= policy.time_budget_s:
                self.stopped = True
                break
            loss = self._batch_step(order, b, elapsed)
            if loss is not None:
                running, count = running + loss, count + 1
            if self.progress is not None:
                self.progress(TrainingProgress(
                    self.step, self.total_steps, epoch + 1, policy.epochs,
                    running / max(count, 1), time.monotonic() - self.t0))
        return running, count

    def _batch_step(self, order: torch.Tensor, b: int, elapsed: float) -> float | None:
        x, y, ann = self.source.batch(order, b)
        x, y, ann = x.to(self.device), y.to(self.device), ann.to(self.device)
        _set_lr(self.opt.optimiser, self.policy, self.step, self.total_steps, elapsed)
        if self.tuner is not None:
            self.tuner.before_step(self.step)
        t_step = time.monotonic()
        loss = self._optimise(x, y, ann)
        if self.tuner is not None:
            self.tuner.after_step(time.monotonic() - t_step)
        self.step += 1
        return loss

    def _optimise(self, x: torch.Tensor, y: torch.Tensor, ann: torch.Tensor) -> float | None:
        """One optimiser step on a batch; its loss, ``None`` when nothing trained is annotated."""
        model, heads, policy, others = self.model, self.heads, self.policy, self.opt.others
        targets = head_targets(y, ann, self.config)
        with torch.set_grad_enabled(not policy.freeze_encoder):
            features = model.features(x)
        logits = {h: model.heads[h](features) for h in heads}
        loss = masked_loss(logits, targets, policy.dice_weight)
        if loss is None:  # this batch annotates nothing the trained heads own
            return None
        if self.opt.teacher is not None:
            with torch.no_grad():
                old = self.opt.teacher(x, [*(heads if policy.distill_weight else []), *others])
            if policy.distill_weight:
                loss = loss + policy.distill_weight * distillation_loss(logits, old, targets)
            if others:
                background = torch.stack([targets[h][0] == 0 for h in heads]).all(dim=0)
                student = {h: model.heads[h](features) for h in others}
                loss = loss + policy.distill_other_heads * conditional_distillation_loss(
                    student, old, background)
        self.opt.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        add_l2sp_gradient(self.opt.anchor, policy.l2sp_alpha)
        self.opt.optimiser.step()
        return float(loss.detach())

    def report(self, optimiser_state: OptimiserState | None) -> TrainingReport:
        return TrainingReport(
            steps=self.step, epochs_completed=self.completed, samples=len(self.source.data),
            seconds=time.monotonic() - self.t0, stopped_by_time_budget=self.stopped,
            epoch_losses=tuple(self.epoch_losses), trained_heads=tuple(self.heads),
            encoder_frozen=self.policy.freeze_encoder, optimiser_state=optimiser_state)


def _heads_to_train(config: ModelConfig, data: PreparedSlices | PreparedVolumes,
                    policy: TrainingPolicy) -> list[str]:
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
