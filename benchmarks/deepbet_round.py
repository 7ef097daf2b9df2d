"""What a training round of the imported deepbet TorchScript 3D U-Net costs on CPU.

deepbet (PyPI, MIT) is imported as ``tessera model import`` does (the description of
tests/node/test_byom_deepbet.py: RAS, one 224-cube window), the Colin27 T1 subject of
that test is segmented, and the brain mask of the AAL atlas (no brainstem) is the
radiologist's correction: ``train_external`` runs ``--steps`` steps (one sample, so one
step per epoch, each on the whole 224-cube) on a copy of the served network, as the
node's round does (``pipeline/external_round.py``). Prints seconds per step, the round's
seconds, peak RSS after training (before any inference) and at the end, and the Dice
of generation 0 and of the candidate against the correction.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.deepbet_round --steps 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.learning.external import ExternalNetwork
from dicom_node.learning.external_training import train_external
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.model_import import import_torchscript
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.volume_inference import segment_any
from dicom_node.learning.volume_samples import volume_sample
from dicom_node.learning.weights import code_dirs_for, load_model, model_from_bytes, model_to_bytes
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.phantom.mr_atlas import generate_subject
from dicom_node.pipeline.volume import Volume, build_volume
from tests.node.test_byom_deepbet import DEEPBET, deepbet_model


def peak_rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


def brain_dice(model: ExternalNetwork, config: ModelConfig, volume: Volume,
               truth: np.ndarray) -> float:
    seg = segment_any(model, config, volume.pixels, volume.spacing, affine=volume.affine)
    return dice_per_label(seg.labels, truth, {"brain": 1})["brain"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)  # the node's default
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = import_torchscript(deepbet_model(), DEEPBET, Path(tmp), name="deepbet-brain").path
        model, config = load_model(path)
        assert isinstance(model, ExternalNetwork)
        subject = generate_subject("A", 0, seed=7101)
        datasets = subject_datasets(subject)
        volume = build_volume(datasets)
        order = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
        aal = (subject.labels > 0).astype(np.uint8)[[order[u] for u in volume.sop_instance_uids]]
        sample = volume_sample(volume.pixels, aal, {"brain"}, volume.spacing, volume.affine)
        candidate, _ = model_from_bytes(model_to_bytes(model, config), config,
                                        code_dirs=code_dirs_for(path))
        assert isinstance(candidate, ExternalNetwork)
        policy = TrainingPolicy(epochs=args.steps, batch_size=1, num_threads=args.threads,
                                learning_rate=args.learning_rate)
        rss_before = peak_rss_mib()
        t0 = time.monotonic()
        report = train_external(candidate, config, [sample], policy)
        round_s = time.monotonic() - t0
        rss_training = peak_rss_mib()
        dice = {"generation 0": brain_dice(model, config, volume, aal),
                "candidate": brain_dice(candidate, config, volume, aal)}
    vp = config.preprocessing.volume
    print(json.dumps({
        "volume": list(volume.shape), "grid": vp.shape if vp else None,
        "threads": args.threads, "steps": report.steps,
        "seconds_per_step": round(report.seconds / max(report.steps, 1), 2),
        "round_seconds": round(round_s, 2), "losses": [round(x, 4) for x in report.epoch_losses],
        "peak_rss_mib": {"before_training": rss_before, "after_training": rss_training,
                         "end": peak_rss_mib()},
        "dice_vs_aal_brain": {k: round(v, 4) for k, v in dice.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
