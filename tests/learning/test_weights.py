"""Weights I/O: safetensors round trips, validation against the config, no unpickling."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from dicom_node.learning.errors import ModelConfigError, WeightsError
from dicom_node.learning.label_specs import HeadSpec, LabelSpec
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.weights import (
    CONFIG_KEY,
    apply_groups,
    arrays_from_bytes,
    arrays_to_bytes,
    extract_groups,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parameter_names_follow_the_hub_contract(tiny_config: ModelConfig) -> None:
    names = list(build_model(tiny_config).state_dict())
    heads = tiny_config.head_names
    for name in names:
        top = name.split(".")
        assert top[0] == "encoder" or (top[0] == "heads" and top[1] in heads), name
    for head in heads:
        assert any(n.startswith(f"heads.{head}.") for n in names)
    # no buffers: everything the hub averages is a trainable weight
    model = build_model(tiny_config)
    assert len(list(model.buffers())) == 0


def test_config_json_round_trip(tiny_config: ModelConfig) -> None:
    again = ModelConfig.from_json(tiny_config.to_json())
    assert again == tiny_config
    assert again.label("liver").code == "10200004"
    assert again.label("body").enclosing


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["heads"].update(extra=["liver"]), "already owned"),
        (lambda d: d["heads"].update(extra=["pancreas"]), "unknown label"),
        (lambda d: d["heads"].pop("spleen"), "owned by no head"),
        (lambda d: d.update(format="other/9"), "format"),
        (lambda d: d.pop("labels"), "missing field 'labels'"),
        (lambda d: d["heads"].update({"Bad.Name": ["liver"]}), "must match"),
    ],
)
def test_invalid_config_names_the_problem(tiny_config: ModelConfig, mutate, message) -> None:
    data = tiny_config.to_dict()
    mutate(data)
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_dict(data)


def test_bytes_round_trip_keeps_weights_and_config(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    data = model_to_bytes(model, tiny_config)
    again, config = model_from_bytes(data)
    assert config == tiny_config
    assert _same_weights(model, again)


def test_file_round_trip_writes_safetensors_and_json(
    tiny_config: ModelConfig, tmp_path: Path
) -> None:
    model = build_model(tiny_config)
    path = save_model(model, tiny_config, tmp_path / "m" / "model.safetensors")
    assert path.exists() and path.with_suffix(".json").exists()
    assert ModelConfig.from_json(path.with_suffix(".json").read_text()) == tiny_config
    again, config = load_model(tmp_path / "m")  # a directory means model.safetensors in it
    assert config == tiny_config
    assert _same_weights(model, again)


def test_renamed_tensor_is_refused_with_its_name(tiny_config: ModelConfig) -> None:
    state = build_model(tiny_config).state_dict()
    state["heads.pancreas.out.weight"] = state.pop("heads.liver.out.weight")
    data = st_save(state, metadata={CONFIG_KEY: tiny_config.to_json()})
    with pytest.raises(WeightsError) as err:
        model_from_bytes(data)
    assert "heads.pancreas.out.weight" in str(err.value)
    assert "heads.liver.out.weight" in str(err.value)


def test_wrong_shape_is_refused_with_both_shapes(tiny_config: ModelConfig) -> None:
    state = build_model(tiny_config).state_dict()
    state["heads.kidneys.out.weight"] = torch.zeros(2, 8, 1, 1)  # config says 3 classes
    data = st_save(state, metadata={CONFIG_KEY: tiny_config.to_json()})
    with pytest.raises(WeightsError, match=r"heads\.kidneys\.out\.weight: shape \(2, 8, 1, 1\)"):
        model_from_bytes(data)


def test_integer_tensor_is_refused(tiny_config: ModelConfig) -> None:
    state = build_model(tiny_config).state_dict()
    state["heads.liver.out.bias"] = torch.zeros(2, dtype=torch.int64)
    data = st_save(state, metadata={CONFIG_KEY: tiny_config.to_json()})
    with pytest.raises(WeightsError, match="not floating point"):
        model_from_bytes(data)


def test_torch_save_file_is_refused_without_unpickling(
    tiny_config: ModelConfig, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(build_model(tiny_config).state_dict(), path)  # a zip of pickles
    with pytest.raises(WeightsError, match="pickle"):
        load_model(path)


class _Boom:
    def __reduce__(self):  # would run code if anything unpickled it
        return (pytest.fail, ("unpickled!",))


@pytest.mark.parametrize("payload", [pickle.dumps(_Boom()), b"\x00" * 3, b"garbage" * 10])
def test_non_safetensors_bytes_are_refused(payload: bytes) -> None:
    with pytest.raises(WeightsError):
        model_from_bytes(payload)


def test_safetensors_whose_header_length_starts_like_a_pickle_are_read() -> None:
    # a header of 0x580 bytes: the file starts b"\x80\x05", the signature of pickle 5
    for pad in range(1200, 1500):
        data = arrays_to_bytes({"w": np.zeros(2, np.float32)}, {"pad": "x" * pad})
        if data[:2] == b"\x80\x05":
            break
    else:
        pytest.fail("no padding gives a 0x580-byte header")
    arrays, meta = arrays_from_bytes(data)
    assert meta["pad"] == "x" * pad and arrays["w"].shape == (2,)


def test_oversized_header_length_is_refused() -> None:
    with pytest.raises(WeightsError, match="header"):
        model_from_bytes(struct.pack("<Q", 10**12) + b"{}")


def test_sidecar_json_must_match_embedded_config(tiny_config: ModelConfig, tmp_path: Path) -> None:
    path = save_model(build_model(tiny_config), tiny_config, tmp_path / "model.safetensors")
    path.with_suffix(".json").write_text(tiny_config.with_generation(7).to_json())
    with pytest.raises(WeightsError, match="does not match"):
        load_model(path)


def test_weights_with_missing_config_are_refused(tiny_config: ModelConfig) -> None:
    data = st_save(build_model(tiny_config).state_dict())
    with pytest.raises(WeightsError, match="no config"):
        model_from_bytes(data)


def test_extract_and_apply_parameter_groups(tiny_config: ModelConfig) -> None:
    source, target = build_model(tiny_config), build_model(tiny_config)
    arrays = extract_groups(source, ["encoder", "heads.liver"])
    assert arrays and all(v.dtype == np.float32 for v in arrays.values())
    assert {n.split(".")[0] for n in arrays} == {"encoder", "heads"}
    assert all(n.startswith(("encoder.", "heads.liver.")) for n in arrays)
    # groups travel as safetensors bytes
    received, meta = arrays_from_bytes(arrays_to_bytes(arrays, {"base_generation": "0"}))
    assert meta == {"base_generation": "0"}
    before_spleen = {k: v.clone() for k, v in target.heads["spleen"].state_dict().items()}
    touched = apply_groups(target, tiny_config, received)
    assert touched == {"encoder", "heads.liver"}
    assert _same_weights(source.encoder, target.encoder)
    assert _same_weights(source.heads["liver"], target.heads["liver"])
    after_spleen = target.heads["spleen"].state_dict()
    assert all(torch.equal(before_spleen[k], after_spleen[k]) for k in before_spleen)


def test_apply_refuses_bad_groups_and_changes_nothing(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arrays = extract_groups(build_model(tiny_config), ["heads.liver"])
    name = next(iter(arrays))
    with pytest.raises(WeightsError, match="non-finite"):
        apply_groups(model, tiny_config, {**arrays, name: arrays[name] * np.nan})
    incomplete = dict(arrays)
    incomplete.pop(name)
    with pytest.raises(WeightsError, match="incomplete"):
        apply_groups(model, tiny_config, incomplete)
    with pytest.raises(WeightsError, match="unexpected"):
        apply_groups(model, tiny_config, {"decoder.x": np.zeros(1, np.float32)})
    with pytest.raises(WeightsError, match="unknown parameter groups"):
        extract_groups(model, ["heads.pancreas"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_with_added_head_round_trips(tiny_config: ModelConfig) -> None:
    model = build_model(tiny_config)
    encoder_before = extract_groups(model, ["encoder"])
    config = tiny_config.with_head(
        HeadSpec("pancreas", ("pancreas",)), [LabelSpec("pancreas", 6, "15776009", "Pancreas")]
    )
    model.add_head(config.head("pancreas"))
    again, cfg = model_from_bytes(model_to_bytes(model, config))
    assert cfg.head_names[-1] == "pancreas"
    encoder_after = extract_groups(again, ["encoder"])
    assert all(np.array_equal(encoder_before[k], encoder_after[k]) for k in encoder_before)
