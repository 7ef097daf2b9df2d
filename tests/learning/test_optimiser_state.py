"""Adam's moments carried from one round to the next (dicom_node.learning.optimiser_state)."""

from __future__ import annotations

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as torch_save

from dicom_node.learning import optimiser_state
from dicom_node.learning.incremental import copy_model
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import PreparedSlices, prepare_samples, samples_from_volume
from dicom_node.learning.training import train
from dicom_node.store import durable

from .conftest import toy_volume

ALL = {"body", "liver", "spleen", "kidney_left", "kidney_right"}
# one full batch per epoch, no augmentation: the steps do not depend on shuffling
FULL_BATCH = TrainingPolicy(epochs=1, batch_size=4, learning_rate=3e-3, augment=False)


def _data(config: ModelConfig, annotated: set[str] = ALL) -> PreparedSlices:
    image, labels = toy_volume(seed=3, slices=4)
    return prepare_samples(samples_from_volume(image, labels, annotated, config), config)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_continued_round_takes_the_steps_one_longer_round_takes(
        tiny_config: ModelConfig) -> None:
    data = _data(tiny_config)
    start = build_model(tiny_config)
    one = copy_model(start, tiny_config)
    train(one, tiny_config, data, replace(FULL_BATCH, epochs=6))

    continued = copy_model(start, tiny_config)
    report = train(continued, tiny_config, data, replace(FULL_BATCH, epochs=3),
                   optimiser_state={})
    assert report.optimiser_state  # a first round ({}) hands its moments on
    saved = optimiser_state.from_bytes(optimiser_state.to_bytes(report.optimiser_state))
    train(continued, tiny_config, data, replace(FULL_BATCH, epochs=3), optimiser_state=saved)

    fresh = copy_model(start, tiny_config)
    train(fresh, tiny_config, data, replace(FULL_BATCH, epochs=3))
    train(fresh, tiny_config, data, replace(FULL_BATCH, epochs=3))

    assert _max_diff(one, continued) < 1e-4
    assert _max_diff(one, fresh) > 100 * max(_max_diff(one, continued), 1e-6)


def test_without_a_state_to_continue_nothing_is_kept(tiny_config: ModelConfig) -> None:
    report = train(build_model(tiny_config), tiny_config, _data(tiny_config), FULL_BATCH)
    assert report.optimiser_state is None


def test_moments_follow_parameter_names_across_rounds_that_train_other_heads(
        tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    liver = train(model, tiny_config, _data(tiny_config, {"liver"}), FULL_BATCH,
                  optimiser_state={}).optimiser_state
    assert liver is not None
    names = {k.split("::")[0] for k in liver}
    assert any(n.startswith("heads.liver.") for n in names)
    assert not any(n.startswith("heads.spleen.") for n in names)

    # a spleen round continues the encoder's moments; the spleen head starts afresh
    spleen_params = [p for p in model.heads["spleen"].parameters()]
    encoder_params = list(model.encoder.parameters())
    groups = [{"params": spleen_params}, {"params": encoder_params}]
    adam = torch.optim.Adam(groups, lr=1e-3)
    assert optimiser_state.restore(model, adam, liver) == len(encoder_params)
    first = next(n for n, _ in model.encoder.named_parameters())
    assert torch.equal(adam.state[encoder_params[0]]["exp_avg"], liver[f"encoder.{first}::exp_avg"])
    assert all(p not in adam.state for p in spleen_params)


def test_moments_that_do_not_fit_start_afresh_with_a_warning(
        tiny_config: ModelConfig, caplog: pytest.LogCaptureFixture) -> None:
    model = build_model(tiny_config)
    saved = train(model, tiny_config, _data(tiny_config), FULL_BATCH,
                  optimiser_state={}).optimiser_state
    assert saved is not None
    names = [n for n, _ in model.named_parameters() if f"{n}::exp_avg" in saved]
    bad = dict(saved)
    bad[f"{names[0]}::exp_avg"] = torch.zeros(3)  # another architecture's shape
    bad[f"{names[1]}::exp_avg_sq"] = torch.full_like(saved[f"{names[1]}::exp_avg_sq"], -1.0)
    bad[f"{names[2]}::exp_avg"] = torch.full_like(saved[f"{names[2]}::exp_avg"], float("nan"))
    del bad[f"{names[3]}::step"]
    bad[f"{names[4]}::step"] = torch.tensor(0.0)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING):
        restored = optimiser_state.restore(model, adam, bad)
    assert restored == len(names) - 5
    assert "5 parameters does not fit" in caplog.text
    params = dict(model.named_parameters())
    assert all(params[n] not in adam.state for n in names[:5])
    # and training from such a state still runs
    report = train(model, tiny_config, _data(tiny_config), FULL_BATCH, optimiser_state=bad)
    assert report.steps == 1 and report.optimiser_state is not None


@pytest.mark.parametrize("data, why", [
    (b"", "shorter than its 8-byte header"),
    (pickle.dumps({"encoder.x::step": 1}), "pickle"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "header"),
    (torch_save({"w::step": torch.ones(1)}), "format None"),
    (torch_save({"w::momentum": torch.ones(1)}, metadata={"format": optimiser_state.FORMAT}),
     "unexpected entries"),
    (torch_save({"w": torch.ones(1)}, metadata={"format": optimiser_state.FORMAT}),
     "unexpected entries"),
    (torch_save({"w::step": torch.ones(1)}, metadata={"format": "tessera-update/1"}),
     "expected 'tessera-optimiser/1'"),
])
def test_a_damaged_or_foreign_file_is_refused_and_the_round_starts_afresh(
        tmp_path: Path, data: bytes, why: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=why):
        optimiser_state.from_bytes(data)
    path = tmp_path / "optimiser" / "m.safetensors"
    path.parent.mkdir()
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        assert optimiser_state.load(path) == {}
    assert "starting afresh" in caplog.text
    assert path.read_bytes() == data  # left for the operator to inspect


def test_save_is_atomic_and_load_of_nothing_is_empty(
        tmp_path: Path, tiny_config: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "optimiser" / "m.safetensors"
    assert optimiser_state.load(path) == {}
    model = build_model(tiny_config)
    first = train(model, tiny_config, _data(tiny_config), FULL_BATCH,
                  optimiser_state={}).optimiser_state
    assert first is not None
    optimiser_state.save(path, first, {"generation": "3"})
    loaded = optimiser_state.load(path)
    assert loaded.keys() == first.keys()
    assert all(torch.equal(loaded[k], first[k]) for k in first)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no .tmp left

    # The next save dies half-way through writing (a crash, a full disk): the file on disk
    # is still the whole previous state, never half of the new one.
    second = train(model, tiny_config, _data(tiny_config), FULL_BATCH,
                   optimiser_state=first).optimiser_state
    assert second is not None and any(not torch.equal(first[k], second[k]) for k in first)
    real_write = durable.write_all

    def dies_half_way(fd: int, data: bytes) -> None:
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_all", dies_half_way)
    with pytest.raises(OSError):
        optimiser_state.save(path, second, {"generation": "4"})
    monkeypatch.undo()
    kept = optimiser_state.load(path)
    assert kept.keys() == first.keys()
    assert all(torch.equal(kept[k], first[k]) for k in first)
