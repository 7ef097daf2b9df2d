"""How a local training round runs, as data: :class:`TrainingPolicy`, the node's own
policy :data:`NODE_ROUND`, and the rehearsal anchors a round mixes in
(:class:`RehearsalPlan`). A leaf without torch: the configuration validates its
``[learning.round]`` and ``[learning.rehearsal]`` sections by building these
(``dicom_node.config.learning``), so each rule is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.learning.errors import TrainingError

__all__ = ["CT_SITES", "NODE_ROUND", "RehearsalPlan", "TrainingPolicy"]

CT_SITES = ("A", "B", "C", "D")  # the CT phantom sites (dicom_node.phantom.ct.SITES)


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
        if not 0.0 < self.encoder_lr_scale <= 1.0:
            raise TrainingError("encoder_lr_scale must be in (0, 1]")
        if self.learning_rate <= 0:
            raise TrainingError("learning_rate must be positive")


# The node's policy for a round (``[learning.round]`` defaults): Dafne's 5 epochs of Adam
# at 1e-3, within 50 s of steps (a round with its preparation stays under a minute), half
# of each batch replayed from earlier local corrections, and against forgetting without
# the data the model came from: the encoder at 1/100 of the heads' rate, learning without
# forgetting on the trained heads and conditional distillation of the others
# (benchmarks/learning.py, benchmarks/partial_labels.py).
NODE_ROUND = TrainingPolicy(time_budget_s=50.0, replay_fraction=0.5, encoder_lr_scale=0.01,
                            distill_weight=10.0, distill_other_heads=1.0)


@dataclass(frozen=True)
class RehearsalPlan:
    """Which anchors a node makes: ``subjects`` phantom subjects of ``site`` (``seed``).

    ``site=""`` turns rehearsal off. ``fraction`` is the share of each training batch
    drawn from the anchors; ``margin`` the anchor Dice a round may lose (vs the round's
    base model) and still be served.

    Raises
    ------
    TrainingError
        ``site`` is not a phantom site; ``subjects`` < 1; ``fraction`` not in [0, 1);
        ``margin`` not in [0, 1].
    """

    site: str = "A"
    subjects: int = 4
    seed: int = 1
    fraction: float = 0.25
    margin: float = 0.02

    def __post_init__(self) -> None:
        if self.site and self.site not in CT_SITES:
            raise TrainingError(f"site must be a phantom site ({', '.join(CT_SITES)}) or '' "
                                f"for no rehearsal site, got {self.site!r}")
        if not 1 <= self.subjects <= 64:
            raise TrainingError(f"subjects must be in [1, 64], got {self.subjects}")
        if not 0.0 <= self.fraction < 1.0:
            raise TrainingError(f"fraction must be in [0, 1), got {self.fraction}")
        if not 0.0 <= self.margin <= 1.0:
            raise TrainingError(f"margin must be in [0, 1], got {self.margin}")

    @property
    def enabled(self) -> bool:
        return bool(self.site) and self.fraction > 0
