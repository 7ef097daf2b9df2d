"""Robust weighting, pure functions: capped shares, clipped deltas, trimmed means, and the
strategies that use them."""

from __future__ import annotations

import numpy as np
import pytest

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub import strategies as agg
from federation_grpc.hub.config import AggregationConfig
from federation_grpc.hub.parameters import update_norm
from federation_grpc.hub.robust import capped_shares, clip_delta, trim_count, trimmed_mean


def model(value: float) -> dict[str, np.ndarray]:
    return {
        "encoder.conv.weight": np.full((2, 2), value, dtype=np.float32),
        "heads.liver.out.weight": np.full((3,), value, dtype=np.float32),
    }


def test_capped_shares_cap_the_liar_and_renormalise_the_others() -> None:
    shares = capped_shares([2**62, 8, 8], 0.5)
    assert shares == pytest.approx([0.5, 0.25, 0.25])
    # Without the cap the liar would take everything.
    assert capped_shares([2**62, 8, 8], 1.0)[0] == pytest.approx(1.0)
    # The others keep their proportions.
    assert capped_shares([1000, 30, 10, 0], 0.5) == pytest.approx([0.5, 0.375, 0.125, 0.0])
    # Capping one may push another over: water-filling caps both.
    shares = capped_shares([100, 90, 1, 1, 1], 0.3)
    assert shares[:2] == pytest.approx([0.3, 0.3])
    assert shares[2:] == pytest.approx([0.4 / 3] * 3)
    assert shares.sum() == pytest.approx(1.0)


def test_capped_shares_within_the_cap_change_nothing_and_infeasible_caps_are_equal() -> None:
    assert capped_shares([3, 1], 0.8) == pytest.approx([0.75, 0.25])
    assert capped_shares([5], 0.5) == pytest.approx([1.0])
    assert capped_shares([9, 1], 0.4) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="positive sum"):
        capped_shares([0, 0], 0.5)
    with pytest.raises(ValueError, match="max_share"):
        capped_shares([1, 1], 0.0)


def test_clip_delta_scales_the_change_to_the_bound_and_keeps_new_tensors() -> None:
    base = model(0.0)
    update = {**model(1.0), "heads.new.out.weight": np.ones(2, np.float32)}
    norm = np.sqrt(4 + 3)
    clipped, measured = clip_delta(update, base, 1.0)
    assert measured == pytest.approx(norm)
    assert update_norm({k: clipped[k] for k in base}, base) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(clipped["encoder.conv.weight"], 1.0 / norm)
    assert clipped["encoder.conv.weight"].dtype == np.float32
    assert np.array_equal(clipped["heads.new.out.weight"], update["heads.new.out.weight"])
    same, _ = clip_delta(update, base, 10.0)
    assert np.array_equal(same["encoder.conv.weight"], update["encoder.conv.weight"])
    off, _ = clip_delta(update, base, 0.0)
    assert np.array_equal(off["encoder.conv.weight"], update["encoder.conv.weight"])


def test_trimmed_mean_drops_the_outlier_at_every_coordinate() -> None:
    arrays = [np.array([1.0, 5.0]), np.array([2.0, 6.0]), np.array([1000.0, -1000.0])]
    assert trim_count(3, 0.34) == 1
    assert trim_count(3, 0.2) == 0
    assert trim_count(2, 0.49) == 0
    assert trimmed_mean(arrays, 0.34) == pytest.approx([2.0, 5.0])  # the median here
    assert trimmed_mean(arrays, 0.0) == pytest.approx(np.mean(arrays, axis=0))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(arrays, 0.5)


def test_fedasync_mixing_weight_is_capped() -> None:
    current = model(0.0)
    liar = agg.Contribution(model(1.0), current, num_samples=2**62, staleness=0)
    assert agg.FedAsync().merge(current, [liar])["encoder.conv.weight"][0, 0] == (
        pytest.approx(0.8)
    )
    capped = agg.FedAsync(max_update_share=0.5).merge(current, [liar])
    assert np.allclose(capped["encoder.conv.weight"], 0.5)


@pytest.mark.parametrize("strategy", [agg.FedBuff(buffer_size=3, max_update_share=0.5),
                                      agg.FedAvg(round_size=3, max_update_share=0.5)])
def test_buffered_strategies_cap_one_update_share(strategy: agg.Strategy) -> None:
    current = model(0.0)
    liar = agg.Contribution(model(10.0), current, num_samples=100_000, staleness=0)
    honest = [agg.Contribution(model(1.0), current, 8, 0) for _ in range(2)]
    merged = strategy.merge(current, [liar, *honest])
    assert np.allclose(merged["encoder.conv.weight"], 0.5 * 10.0 + 0.5 * 1.0)
    uncapped = type(strategy)(3).merge(current, [liar, *honest])  # type: ignore[call-arg]
    assert uncapped["encoder.conv.weight"][0, 0] > 9.9


@pytest.mark.parametrize("strategy", [agg.FedBuff(buffer_size=3, trim_fraction=0.34),
                                      agg.FedAvg(round_size=3, trim_fraction=0.34)])
def test_buffered_strategies_trim_an_outlier(strategy: agg.Strategy) -> None:
    current = model(0.0)
    outlier = agg.Contribution(model(-50.0), current, num_samples=8, staleness=0)
    a = agg.Contribution(model(1.0), current, 8, 0)
    b = agg.Contribution(model(2.0), current, 8, 0)
    merged = strategy.merge(current, [outlier, a, b])
    assert np.allclose(merged["encoder.conv.weight"], 1.0)


def test_config_passes_the_robust_options_and_checks_their_ranges() -> None:
    fedbuff = agg.make_strategy(
        "fedbuff",
        **AggregationConfig(strategy="fedbuff", trim_fraction=0.2).strategy_options(),
    )
    assert isinstance(fedbuff, agg.FedBuff)
    assert (fedbuff.max_update_share, fedbuff.trim_fraction) == (0.5, 0.2)
    fedasync = agg.make_strategy(
        "fedasync", **AggregationConfig(strategy="fedasync").strategy_options())
    assert isinstance(fedasync, agg.FedAsync) and fedasync.max_update_share == 0.5
    delta = agg.make_strategy("delta", **AggregationConfig().strategy_options())
    assert isinstance(delta, agg.DeltaAsync) and delta.server_lr == 1.0
    for bad in ({"max_update_share": 0.0}, {"clip_norm": -1.0}, {"trim_fraction": 0.5}):
        with pytest.raises(InvalidRequest):
            AggregationConfig(**bad)  # type: ignore[arg-type]


def test_the_share_report_names_what_the_cap_took() -> None:
    current = model(0.0)
    liar = agg.Contribution(model(10.0), current, num_samples=100_000, staleness=0)
    honest = [agg.Contribution(model(1.0), current, 8, 0) for _ in range(2)]
    report = agg.capped_shares_report(agg.FedAvg(3, max_update_share=0.5), [liar, *honest])
    assert report[0][0] == pytest.approx(100_000 / 100_016)
    assert [given for _, given in report] == pytest.approx([0.5, 0.25, 0.25])
    fedasync = agg.capped_shares_report(
        agg.FedAsync(max_update_share=0.5, sample_halfpoint=16), [liar])
    assert fedasync[0] == pytest.approx((0.8 * 100_000 / 100_016, 0.5))
    few = agg.capped_shares_report(
        agg.FedAsync(max_update_share=0.5, sample_halfpoint=16), [honest[0]])
    assert few[0][0] == few[0][1] == pytest.approx(0.8 * 8 / 24)


def test_delta_gives_a_lying_sample_count_no_weight() -> None:
    """The default strategy adds each change at server_lr x staleness discount: a node
    declaring 2**62 samples moves the model exactly as far as one declaring 1."""
    current = model(0.0)
    strategy = agg.make_strategy("delta", **AggregationConfig().strategy_options())
    honest = [agg.Contribution(model(1.0), current, num_samples=1, staleness=0),
              agg.Contribution(model(-1.0), current, num_samples=1, staleness=0)]
    liar = [agg.Contribution(model(1.0), current, num_samples=2**62, staleness=0),
            honest[1]]
    for name, value in strategy.merge(current, honest).items():
        np.testing.assert_array_equal(value, strategy.merge(current, liar)[name])
        np.testing.assert_array_equal(value, current[name])  # the two changes cancel
    stale = strategy.merge(current, [agg.Contribution(model(1.0), current, 2**62, staleness=3)])
    assert stale["encoder.conv.weight"][0, 0] == pytest.approx(0.5)  # (1 + 3) ** -0.5
