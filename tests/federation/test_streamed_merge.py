"""Block-by-block merges: the same tensors as a whole-model merge, in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation_grpc.hub import strategies as agg
from federation_grpc.hub import streamed_merge
from federation_grpc.hub.robust import clip_delta, clip_scale, delta_norm
from federation_grpc.hub.streamed_merge import merge_to_file
from federation_grpc.hub.tensorfile import blocks_of, read_tensors, write_blocks, write_tensors

SIZE = 10_000  # more than two blocks of MIN_BLOCK


def model(seed: int, heads: tuple[str, ...] = ("liver",)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "encoder.weight": rng.normal(size=(SIZE // 100, 100)).astype(np.float32),
        "encoder.bias": rng.normal(size=(7,)).astype(np.float64),
        "encoder.count": np.array(seed, dtype=np.int64),
    }
    for head in heads:
        out[f"heads.{head}.weight"] = rng.normal(size=(SIZE,)).astype(np.float16)
    return out


def contributions(tmp_path: Path) -> tuple[dict[str, np.ndarray], list[agg.Contribution]]:
    current = model(0)
    base = model(1)
    write_tensors(tmp_path / "current", current)
    write_tensors(tmp_path / "base", base)
    mapped_base = read_tensors(tmp_path / "base")
    out = []
    for seed, heads in ((2, ("liver",)), (3, ("liver", "spleen")), (4, ("spleen",)),
                        (5, ("liver",))):
        update = model(seed, heads)
        if "liver" not in heads:
            update = {k: v for k, v in update.items() if not k.startswith("heads.liver")}
        write_tensors(tmp_path / f"u{seed}", update)
        out.append(agg.Contribution(read_tensors(tmp_path / f"u{seed}"), mapped_base,
                                    num_samples=seed * 3, staleness=seed % 2))
    return read_tensors(tmp_path / "current"), out


@pytest.mark.parametrize(
    "strategy",
    [
        agg.FedAsync(),
        agg.FedBuff(buffer_size=4, server_lr=0.7),
        agg.FedAvg(round_size=4, max_update_share=0.4),
        agg.FedBuff(buffer_size=4, trim_fraction=0.25),
        agg.DeltaAsync(),
        agg.Dafne(),
    ],
    ids=["fedasync", "fedbuff", "fedavg-capped", "fedbuff-trimmed", "delta", "dafne"],
)
def test_block_merge_equals_the_whole_model_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: agg.Strategy
) -> None:
    monkeypatch.setattr(streamed_merge, "BLOCK_BUDGET_BYTES", 1)  # MIN_BLOCK elements
    current, updates = contributions(tmp_path)
    want = strategy.merge(current, updates)
    merge_to_file(tmp_path / "merged", strategy, current, updates)
    got = read_tensors(tmp_path / "merged")
    assert sorted(got) == sorted(want)  # the new head (spleen) included
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_block_merge_applies_the_clip_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(streamed_merge, "BLOCK_BUDGET_BYTES", 1)
    current, updates = contributions(tmp_path)
    limit = delta_norm(updates[0].tensors, updates[0].base) / 3
    clipped, _ = clip_delta(updates[0].tensors, updates[0].base, limit)
    strategy = agg.FedAsync()
    want = strategy.merge(current, [agg.Contribution(clipped, updates[0].base, 6, 0)])
    scale = clip_scale(delta_norm(updates[0].tensors, updates[0].base), limit)
    assert scale < 1
    merge_to_file(tmp_path / "merged", strategy, current, updates[:1], [scale])
    got = read_tensors(tmp_path / "merged")
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)


def test_write_blocks_refuses_blocks_that_do_not_fill_the_layout(tmp_path: Path) -> None:
    layout = [("a", np.dtype("<f4"), (4,)), ("b", np.dtype("<f4"), (2,))]
    with pytest.raises(ValueError, match="ended early"):
        write_blocks(tmp_path / "x", layout, [("a", np.zeros(3)), ("b", np.zeros(2))])
    with pytest.raises(ValueError, match="order"):
        write_blocks(tmp_path / "x", layout,
                     [("a", np.zeros(4)), ("b", np.zeros(2)), ("a", np.zeros(1))])
    with pytest.raises(ValueError, match="bytes"):
        write_blocks(tmp_path / "x", layout, [("a", np.zeros(4))])


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_reading_a_mapped_model_block_by_block_keeps_its_pages_out_of_memory(
    tmp_path: Path,
) -> None:
    size = 96 << 20
    path = tmp_path / "big"
    write_tensors(path, {"w": np.ones(size // 4, dtype=np.float32)})
    mapped = read_tensors(path)["w"]
    before = _rss_file_kb()
    total = sum(float(block.sum()) for block in blocks_of(mapped))
    grown = _rss_file_kb() - before
    assert total == size // 4
    assert grown < (size >> 10) // 4, f"{grown} kB of a {size >> 20} MB file stayed resident"


def test_a_merge_of_mapped_models_keeps_their_pages_out_of_memory(tmp_path: Path) -> None:
    # The blocks of a merge of several updates start anywhere in a page: read from the
    # map and handed back by madvise, the pages around each block's start stayed mapped.
    size = 16 << 20
    rng = np.random.default_rng(0)
    for name in ("current", "u1", "u2", "u3"):
        write_tensors(tmp_path / name, {"w": rng.random(size // 4, dtype=np.float32)})
    current = read_tensors(tmp_path / "current")
    updates = [agg.Contribution(read_tensors(tmp_path / name), current, 10, 0)
               for name in ("u1", "u2", "u3")]
    assert streamed_merge.block_elements(3) * 4 % 4096  # blocks not page-aligned
    (tmp_path / "warm").mkdir()
    warm = contributions(tmp_path / "warm")
    merge_to_file(tmp_path / "warm" / "merged", agg.FedAvg(round_size=3), *warm)
    before = _rss_file_kb()  # (the code's own pages are in already)
    merge_to_file(tmp_path / "merged", agg.FedAvg(round_size=3), current, updates)
    grown = _rss_file_kb() - before
    expected = (updates[0].tensors["w"].astype(np.float64) + updates[1].tensors["w"]
                + updates[2].tensors["w"]) / 3
    np.testing.assert_allclose(read_tensors(tmp_path / "merged")["w"], expected, rtol=1e-6)
    assert grown < (size >> 10) // 16, f"{grown} kB of four {size >> 20} MB files stayed resident"
