"""Out-of-domain flag rate: the abdomen starter on phantom sites A-D (in its domain, C and
D shifted) against a real head CT (Debian's invesalius-examples), judged by the node's
own check (``dicom_node/pipeline/domain.py``) at the configured threshold.

Run: ``.venv/bin/python benchmarks/domain.py [--subjects 3] [--threshold 0.05]``; needs
``invesalius-examples`` (tests/install-peers.sh installs it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from harness import timed

from dicom_node.config import InferenceSettings
from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.weights import load_model
from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.head_ct import head_ct_subject
from dicom_node.phantom.subject import PhantomSubject
from dicom_node.pipeline.domain import DomainVerdict, check_domain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=3, help="phantom subjects per site")
    ap.add_argument("--seed", type=int, default=4242, help="phantom seed (unseen subjects)")
    ap.add_argument("--threshold", type=float,
                    default=InferenceSettings().min_structure_fraction,
                    help="[inference] min_structure_fraction to judge with")
    args = ap.parse_args()
    model, config = load_model(STARTER_DIR / "model.safetensors")

    def judge(subject: PhantomSubject) -> DomainVerdict:
        result = segment_volume(model, config, subject.image.astype(np.float32),
                                subject.spacing)
        return check_domain(result.labels, subject.spacing, config.label_values,
                            args.threshold)

    rows = []
    cases = [(f"site {site}", lambda s=site, i=i: generate_subject(s, 100 + i, args.seed))
             for site in "ABCD" for i in range(args.subjects)]
    cases.append(("head CT", head_ct_subject))
    for name, make in cases:
        verdict, seconds = timed(lambda make=make: judge(make()))
        rows.append({"case": name, **verdict.to_json()})
        print(f"{name:<8} structure fraction {verdict.structure_fraction:.4f} "
              f"{'in domain' if verdict.in_domain else 'FLAGGED'} ({seconds:.0f} s)",
              flush=True)
    phantom = [r for r in rows if r["case"].startswith("site")]
    head = [r for r in rows if r["case"] == "head CT"]
    summary = {
        "threshold": args.threshold,
        "in_domain_flag_rate": sum(not r["in_domain"] for r in phantom) / len(phantom),
        "in_domain_fraction_range": [min(r["structure_fraction"] for r in phantom),
                                     max(r["structure_fraction"] for r in phantom)],
        "head_ct_flagged": all(not r["in_domain"] for r in head),
        "head_ct_fraction": head[0]["structure_fraction"],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
