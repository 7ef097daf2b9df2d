"""Models of any size for the scale benchmarks (``large_model.py``, ``many_nodes.py``):
written to safetensors in blocks, so a 2 GB model never sits in this process's memory,
and hashed in blocks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from federation_grpc.hub.tensorfile import write_blocks

CONFIG = json.dumps({"architecture": "bench", "heads": {"liver": ["liver"]}})
HEAD = 4096
BLOCK = 16 << 20  # floats per generated block (64 MB)


def model_file(path: Path, size_mb: float, step: float, seed: int) -> None:
    """A model of ``size_mb`` written in blocks; ``step`` > 0 nudges it (an update)."""
    floats = max(HEAD, int(size_mb * (1 << 20) / 4) - HEAD)

    def blocks() -> Iterator[tuple[str, np.ndarray]]:
        for index, start in enumerate(range(0, floats, BLOCK)):
            values = np.random.default_rng(index).standard_normal(
                min(BLOCK, floats - start), dtype=np.float32)
            if step:
                values += np.float32(step) * np.random.default_rng(
                    (seed, index)).standard_normal(values.size, dtype=np.float32)
            yield "encoder.weight", values
        yield "heads.liver.weight", np.full(HEAD, 0.5 + step, dtype=np.float32)

    layout = [("encoder.weight", np.dtype("<f4"), (floats,)),
              ("heads.liver.weight", np.dtype("<f4"), (HEAD,))]
    write_blocks(path, layout, blocks())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
