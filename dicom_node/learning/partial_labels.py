"""Partial labels (SegViz): a hospital trains the heads of the labels it annotates.

A hospital declares the labels it annotates (``[learning] annotated_labels``). A
correction keeps only those labels, so a round trains the encoder plus the heads that
own at least one of them; within a head, labels the sample does not annotate are
merged with background (the marginal loss of :func:`losses.masked_loss`), and a head
none of whose labels is annotated is not run at all. The update therefore carries
``encoder`` + ``heads.<h>`` for exactly those heads (:func:`declared_groups`), and the
hub merges each head only from the updates that carry it, the encoder from all.

The enclosing label (``body``) follows the same rule: its head trains only where a
hospital annotates ``body``. It cannot be derived from organ labels: every liver voxel
is body, but a liver-only label map says nothing about where the body ends, so such a
"target" has no negatives and would teach the head to call everything body.

Where ``body`` *is* annotated but an organ is not, the organ's voxels can be 0 in the
label map: a SEG whose body segment is cut around the organs (the node's own SEGs are
written that way, one label per voxel) and whose organ segment was deleted. Taken as
is, that would teach the body head that the spleen is outside the body. An enclosing
label contains every other label, so it has no holes: :func:`fill_enclosing` fills
them (per slice) before the targets are built.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np
from scipy import ndimage

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.model_config import ModelConfig


def heads_for_labels(config: ModelConfig, labels: Iterable[str]) -> tuple[str, ...]:
    """Heads (in model order) that own at least one of ``labels``."""
    wanted = set(labels)
    return tuple(h.name for h in config.heads if wanted & set(h.labels))


def declared_groups(config: ModelConfig, labels: Iterable[str],
                    *, encoder: bool = True) -> tuple[str, ...]:
    """Parameter groups an update from a hospital annotating ``labels`` may carry."""
    heads = tuple(f"heads.{h}" for h in heads_for_labels(config, labels))
    return (("encoder",) if encoder else ()) + heads


def check_annotated_labels(labels: Collection[str], models: Sequence[ModelConfig],
                           key: str = "learning.annotated_labels") -> None:
    """Every declared label must be a label of at least one model the node serves.

    Raises
    ------
    ModelConfigError
        Naming ``key``, the unknown labels and the labels each model knows.
    """
    if not labels or not models:
        return
    known = {name for config in models for name in config.label_values}
    unknown = sorted(set(labels) - known)
    if unknown:
        offered = "; ".join(f"{c.name}: {', '.join(c.label_values)}" for c in models)
        raise ModelConfigError(f"{key}: {', '.join(map(repr, unknown))} "
                               f"{'is not a label' if len(unknown) == 1 else 'are not labels'}"
                               f" of any model this node serves ({offered})")


def fill_enclosing(labels: np.ndarray, annotated: Collection[str],
                   config: ModelConfig) -> np.ndarray:
    """``labels`` with holes of each annotated enclosing label filled with its value.

    ``labels`` is one slice ``(rows, cols)`` or a stack ``(n, rows, cols)``; holes are
    filled in each slice (2D): voxels that are 0 yet enclosed by labelled voxels. Other
    voxels are untouched; the input is not modified.
    """
    enclosing = [lab for lab in config.labels if lab.enclosing and lab.name in annotated]
    if not enclosing:
        return labels
    out = labels.copy()
    stack = out if out.ndim == 3 else out[None]
    for k in range(stack.shape[0]):
        inside = stack[k] != 0
        if not inside.any():
            continue
        holes = ndimage.binary_fill_holes(inside) & ~inside
        if holes.any():
            # with several enclosing labels (unusual) the first declared one wins
            stack[k][holes] = enclosing[0].value
    return out
