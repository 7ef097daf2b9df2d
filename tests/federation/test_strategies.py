"""Aggregation pure functions: weights, staleness, per-group merging, buffering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from federation_grpc.hub import strategies as agg
from federation_grpc.hub.parameters import (
    group_of,
    groups_of,
    is_head_group,
    non_finite_tensors,
    update_norm,
)


def model(value: float) -> dict[str, np.ndarray]:
    return {
        "encoder.conv.weight": np.full((2, 2), value, dtype=np.float32),
        "bottleneck.weight": np.full((3,), value, dtype=np.float32),
        "heads.liver.out.weight": np.full((2,), value, dtype=np.float32),
        "heads.spleen.out.weight": np.full((2,), value, dtype=np.float32),
    }


def only(tensors: dict[str, np.ndarray], *groups: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if group_of(k) in groups}


def test_group_names_follow_the_network_convention() -> None:
    assert group_of("encoder.block1.conv.weight") == "encoder"
    assert group_of("bottleneck.weight") == "bottleneck"
    assert group_of("heads.liver.out.bias") == "heads.liver"
    assert is_head_group("heads.liver") and not is_head_group("encoder")
    assert set(groups_of(model(0))) == {"encoder", "bottleneck", "heads.liver", "heads.spleen"}


def test_staleness_discount_shrinks_with_age_and_samples_saturate() -> None:
    weights = [agg.staleness_weight(s) for s in range(5)]
    assert weights[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert agg.staleness_weight(-3) == 1.0
    assert agg.sample_weight(16, 16.0) == pytest.approx(0.5)
    assert agg.sample_weight(0, 16.0) == 0.0
    assert agg.sample_weight(1000, 16.0) < 1.0
    fresh = agg.fedasync_mixing(32, 0, alpha=0.8, halfpoint=16, exponent=0.5)
    stale = agg.fedasync_mixing(32, 3, alpha=0.8, halfpoint=16, exponent=0.5)
    few = agg.fedasync_mixing(4, 0, alpha=0.8, halfpoint=16, exponent=0.5)
    assert fresh == pytest.approx(0.8 * 32 / 48)
    assert stale == pytest.approx(fresh / 2)
    assert few < fresh


def test_fedasync_merges_the_encoder_always_and_a_head_only_when_trained() -> None:
    current = model(0.0)
    update = only(model(1.0), "encoder", "bottleneck", "heads.liver")
    contribution = agg.Contribution(update, current, num_samples=16, staleness=0)
    merged = agg.FedAsync(alpha=1.0, sample_halfpoint=16).merge(current, [contribution])
    assert np.allclose(merged["encoder.conv.weight"], 0.5)
    assert np.allclose(merged["bottleneck.weight"], 0.5)
    assert np.allclose(merged["heads.liver.out.weight"], 0.5)
    assert np.allclose(merged["heads.spleen.out.weight"], 0.0)
    assert merged["encoder.conv.weight"].dtype == np.float32
    assert np.allclose(current["encoder.conv.weight"], 0.0), "inputs must not be mutated"


def test_fedasync_stale_update_moves_the_model_less() -> None:
    current = model(0.0)
    fresh = agg.Contribution(model(1.0), current, num_samples=16, staleness=0)
    stale = agg.Contribution(model(1.0), current, num_samples=16, staleness=8)
    strategy = agg.FedAsync(alpha=1.0, sample_halfpoint=16, staleness_exponent=0.5)
    moved_fresh = strategy.merge(current, [fresh])["encoder.conv.weight"][0, 0]
    moved_stale = strategy.merge(current, [stale])["encoder.conv.weight"][0, 0]
    assert moved_fresh == pytest.approx(0.5)
    assert moved_stale == pytest.approx(0.5 / 3)


def test_fedbuff_averages_deltas_per_group_weighted_by_samples() -> None:
    base = model(0.0)
    liver = agg.Contribution(only(model(3.0), "encoder", "bottleneck", "heads.liver"), base, 30, 0)
    spleen = agg.Contribution(
        only(model(1.0), "encoder", "bottleneck", "heads.spleen"), base, 10, 0
    )
    strategy = agg.FedBuff(buffer_size=2, server_lr=1.0)
    assert strategy.batch_size() == 2
    merged = strategy.merge(base, [liver, spleen])
    assert np.allclose(merged["encoder.conv.weight"], (3.0 * 30 + 1.0 * 10) / 40)
    assert np.allclose(merged["heads.liver.out.weight"], 3.0)
    assert np.allclose(merged["heads.spleen.out.weight"], 1.0)


def test_fedbuff_takes_each_delta_against_its_own_base() -> None:
    old_base = model(0.0)
    current = model(1.0)
    # Trained from generation 0 (all zeros) to 0.5: its delta is +0.5, applied on top of 1.0.
    stale = agg.Contribution(model(0.5), old_base, num_samples=10, staleness=1)
    merged = agg.FedBuff(buffer_size=1).merge(current, [stale])
    assert np.allclose(merged["encoder.conv.weight"], 1.5)


def test_fedavg_is_the_sample_weighted_mean_of_carriers() -> None:
    current = model(0.0)
    a = agg.Contribution(model(2.0), current, 1, 0)
    b = agg.Contribution(only(model(5.0), "encoder", "bottleneck"), current, 3, 0)
    merged = agg.FedAvg(round_size=2).merge(current, [a, b])
    assert np.allclose(merged["encoder.conv.weight"], (2.0 + 15.0) / 4)
    assert np.allclose(merged["heads.liver.out.weight"], 2.0)


def test_non_float_tensors_take_the_latest_value() -> None:
    current = {"encoder.bn.num_batches_tracked": np.array(3, dtype=np.int64)}
    update = {"encoder.bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    for strategy in (agg.FedAsync(), agg.FedBuff(buffer_size=1), agg.FedAvg(round_size=1)):
        merged = strategy.merge(current, [agg.Contribution(update, current, 5, 0)])
        assert int(merged["encoder.bn.num_batches_tracked"]) == 7


def test_norms_and_finiteness() -> None:
    base = model(0.0)
    update = model(1.0)
    assert update_norm(update, base) == pytest.approx(np.sqrt(4 + 3 + 2 + 2))
    bad = dict(update, **{"heads.liver.out.weight": np.array([np.nan, 1.0], dtype=np.float32)})
    assert non_finite_tensors(bad) == ["heads.liver.out.weight"]
    assert non_finite_tensors(update) == []


def test_make_strategy_by_name() -> None:
    assert agg.make_strategy("fedbuff", buffer_size=4).batch_size() == 4
    assert isinstance(agg.make_strategy("fedavg"), agg.FedAvg)
    with pytest.raises(ValueError, match="unknown strategy"):
        agg.make_strategy("median")


def contribution(tensors: dict[str, np.ndarray], base: dict[str, np.ndarray],
                 staleness: int = 0, num_samples: int = 1) -> agg.Contribution:
    return agg.Contribution(tensors=tensors, base=base, num_samples=num_samples,
                            staleness=staleness)


def test_delta_keeps_a_gain_that_a_later_update_from_the_same_base_did_not_see() -> None:
    # Base 0. Site C moved the encoder to 1; site A, from the same base, left it at 0.
    base = model(0.0)
    c = contribution(only(model(1.0), "encoder"), base)
    a = contribution(only(model(0.0), "encoder"), base, staleness=1)
    delta = agg.make_strategy("delta", server_lr=1.0, staleness_exponent=0.5)
    merged = delta.merge(base, [c, a])
    assert np.allclose(merged["encoder.conv.weight"], 1.0)  # A's zero delta took nothing
    # Mixing full tensors (FedAsync) pulls C's gain back toward A's stale copy.
    mixed = agg.make_strategy("fedasync", alpha=0.8, sample_halfpoint=1.0).merge(base, [c, a])
    assert float(mixed["encoder.conv.weight"][0, 0]) < 0.5
    # Groups not carried stay; a stale delta is discounted by (1 + s) ** -0.5.
    assert np.allclose(merged["heads.liver.out.weight"], 0.0)
    stale = delta.merge(base, [contribution(only(model(1.0), "encoder"), base, staleness=3)])
    assert np.allclose(stale["encoder.conv.weight"], 0.5)


def test_dafne_halves_every_update_into_its_own_generation() -> None:
    dafne = agg.make_strategy("dafne")
    assert (dafne.batch_size(), dafne.max_batch()) == (1, 1)
    base = model(0.0)
    # Whatever the sample count or staleness: merged = 0.5 current + 0.5 update.
    merged = dafne.merge(base, [contribution(only(model(1.0), "encoder"), base,
                                             staleness=5, num_samples=1000)])
    assert np.allclose(merged["encoder.conv.weight"], 0.5)
    assert np.allclose(merged["heads.spleen.out.weight"], 0.0)


def test_configured_names_build_the_new_strategies() -> None:
    from federation_grpc.hub.config import AggregationConfig

    for name, cls in (("delta", agg.DeltaAsync), ("dafne", agg.Dafne)):
        config = AggregationConfig(strategy=name)
        assert isinstance(agg.make_strategy(name, **config.strategy_options()), cls)
