"""Training an external (MONAI or TorchScript) network: MONAI's Dice-CE loss with our
partial-label masking.

A sample annotates some labels. Output channels of labels it does not annotate are
merged into background before the loss (marginal loss, as for our heads: "background
or an unannotated label" is what is scored), so a hospital that annotates only the
liver teaches the liver channel and never pushes the spleen channel toward background.
The merged log-probabilities go to :class:`monai.losses.DiceCELoss` as logits (a
softmax of log-probabilities returns them unchanged).

3D networks train on random windows of ``preprocessing.volume.roi_size`` cut from the
volume prepared exactly as for inference (reorientation, resampling, intensity); 2D
networks on slices prepared as for inference. The network is one parameter group
(``network``): policies that train some heads only, freeze an encoder or distil other
heads are refused (they need a network with heads, see
:data:`~dicom_node.learning.external.WITH_HEADS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from dicom_node.learning.errors import TrainingError
from dicom_node.learning.external import NETWORK_HEAD, WITH_HEADS, ExternalNetwork
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.preprocessing import intensity_range, prepare_slices, resize_labels
from dicom_node.learning.training import TrainingReport
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.volume_windows import class_balanced_window, volume_pair

LOGGER = logging.getLogger(__name__)


def check_policy(policy: TrainingPolicy) -> None:
    """Refuse what needs separate heads (see :mod:`dicom_node.learning.external`)."""
    if policy.freeze_encoder or (policy.heads is not None and policy.heads != (NETWORK_HEAD,)):
        raise TrainingError("an external network is one group 'network': training some heads "
                            f"on a frozen encoder (continual heads) needs {WITH_HEADS}")
    if policy.distill_weight or policy.distill_other_heads:
        raise TrainingError(f"distillation between heads needs {WITH_HEADS}")


def _prepared(sample: VolumeSample, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image (N, C, *spatial), channel target (N, *spatial) long)`` at model resolution."""
    if sample.image.shape != sample.labels.shape:
        raise TrainingError(f"volume {sample.image.shape} and labels {sample.labels.shape} differ")
    channel = np.zeros(sample.labels.shape, dtype=np.uint8)
    for j, name in enumerate(config.heads[0].labels, start=1):
        channel[sample.labels == config.label(name).value] = j
    pp = config.preprocessing
    if config.spatial_dims == 2:
        x = prepare_slices(sample.image, pp, intensity_range(sample.image, pp))
        y = torch.from_numpy(channel)
        return x, resize_labels(y, (pp.input_size, pp.input_size)).long()
    assert pp.volume is not None
    x, t = volume_pair(sample, channel, pp.volume)
    return x, t.long()


def marginal_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with unannotated channels merged into background (channel 0).

    ``annotated``: ``(labels,)`` bool; returns ``(N, 1 + annotated, ...)``.
    """
    logp = logits.float().log_softmax(dim=1)
    keep = torch.nonzero(annotated).flatten() + 1
    merged = torch.cat([torch.ones(1, dtype=torch.bool, device=annotated.device), ~annotated])
    background = torch.logsumexp(logp[:, merged], dim=1, keepdim=True)
    return torch.cat([background, logp[:, keep]], dim=1)


def train_external(
    model: ExternalNetwork,
    config: ModelConfig,
    samples: Sequence[VolumeSample],
    policy: TrainingPolicy,
) -> TrainingReport:
    """Train ``model`` in place for ``policy.epochs`` passes over ``samples`` (one window
    or one slice batch per sample and step), within ``policy.time_budget_s``."""
    check_policy(policy)
    prepared = _prepared_samples(config, samples)
    device = torch.device(policy.device)
    gen = torch.Generator().manual_seed(policy.seed)
    optimisation = _Optimisation.start(model, config, policy, device)
    step, completed, stopped, losses = 0, 0, False, []
    t0 = time.monotonic()
    try:
        for _epoch in range(policy.epochs):
            running, stopped = _one_pass(prepared, optimisation, config, policy, gen, t0)
            step += len(running)
            if running:
                losses.append(float(np.mean(running)))
            if stopped:
                break
            completed += 1
    finally:
        model.to("cpu").eval()
    return TrainingReport(
        steps=step, epochs_completed=completed, samples=len(prepared),
        seconds=time.monotonic() - t0, stopped_by_time_budget=stopped,
        epoch_losses=tuple(losses), trained_heads=(NETWORK_HEAD,), encoder_frozen=False)


_Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _prepared_samples(config: ModelConfig, samples: Sequence[VolumeSample]) -> list[_Prepared]:
    """Check the samples against the model, then ``(image, target, annotated)`` for each
    sample that annotates a label."""
    if not samples:
        raise TrainingError("no training samples")
    labels = config.heads[0].labels
    unknown = {n for s in samples for n in s.annotated} - set(labels)
    if unknown:
        raise TrainingError(f"annotated labels {sorted(unknown)} are not in model {config.name}")
    if not any(s.annotated for s in samples):
        raise TrainingError("the samples annotate no label of the model")
    return [(*_prepared(s, config),
             torch.tensor([n in s.annotated for n in labels], dtype=torch.bool))
            for s in samples if s.annotated]


@dataclass(frozen=True)
class _Optimisation:
    """The loss, the optimiser and the L2-SP anchor of one training run."""

    model: ExternalNetwork
    device: torch.device
    label_count: int
    loss_fn: DiceCELoss
    optimiser: torch.optim.Optimizer
    anchor: Sequence[tuple[torch.Tensor, torch.Tensor]]
    l2sp_alpha: float

    @classmethod
    def start(cls, model: ExternalNetwork, config: ModelConfig, policy: TrainingPolicy,
              device: torch.device) -> _Optimisation:
        """Move ``model`` to ``device`` in training mode and set up its optimiser."""
        loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False,
                             lambda_dice=policy.dice_weight, lambda_ce=1.0)
        model.to(device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=policy.learning_rate,
                                     weight_decay=policy.weight_decay)
        anchor = ([(p, p.detach().clone()) for p in model.parameters()]
                  if policy.l2sp_alpha > 0 else [])
        return cls(model, device, len(config.heads[0].labels), loss_fn, optimiser, anchor,
                   policy.l2sp_alpha)

    def step(self, x: torch.Tensor, y: torch.Tensor, ann: torch.Tensor) -> float:
        """One optimiser step on a batch; returns its loss."""
        # target channels: 0 background (or unannotated), then annotated labels
        remap = torch.zeros(self.label_count + 1, dtype=torch.long)
        remap[torch.nonzero(ann).flatten() + 1] = torch.arange(1, int(ann.sum()) + 1)
        target = remap[y][:, None].to(self.device)
        logits = self.model(x.to(self.device))[NETWORK_HEAD]
        loss = self.loss_fn(marginal_log_probs(logits, ann.to(self.device)), target)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # L2-SP toward the round's starting weights
            for p, p0 in self.anchor:
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=self.l2sp_alpha)
        self.optimiser.step()
        return float(loss.detach())


def _one_pass(prepared: list[_Prepared], optimisation: _Optimisation, config: ModelConfig,
              policy: TrainingPolicy, gen: torch.Generator, t0: float) -> tuple[list[float], bool]:
    """One pass over the samples in random order: the step losses, and whether the time
    budget stopped it."""
    vp = config.preprocessing.volume
    running: list[float] = []
    for i in torch.randperm(len(prepared), generator=gen).tolist():
        budget = policy.time_budget_s
        if budget is not None and time.monotonic() - t0 >= budget:
            return running, True
        x, y, ann = prepared[i]
        if config.spatial_dims == 3:
            assert vp is not None
            x, y = class_balanced_window(x, y, vp.roi_size, gen)
        else:
            pick = torch.randperm(x.shape[0], generator=gen)[: policy.batch_size]
            x, y = x[pick], y[pick]
        running.append(optimisation.step(x, y, ann))
    return running, False
