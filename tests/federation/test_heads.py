"""Continual classes at the hub: head specs, config edits, first weights of a new head,
their merge, and ``tessera hub add-head`` against a hub database (real CLI process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from federation_grpc.errors import FailedPrecondition, InvalidRequest
from federation_grpc.hub import heads
from federation_grpc.hub import strategies as agg
from federation_grpc.hub.config import HubConfig, load_config
from federation_grpc.hub.service import HubService

from .hubproc import REPO

KIDNEYS = [
    {"name": "kidney_left", "value": 4, "code": "18639004", "meaning": "Left kidney"},
    {"name": "kidney_right", "value": 5, "code": "9846003", "meaning": "Right kidney"},
]


def model_config() -> dict:  # type: ignore[type-arg]
    return {
        "format": "tessera-model/1", "name": "m", "generation": 0,
        "architecture": "unet2d-multihead",
        "hyperparameters": {"channels": [8, 16], "decoder_convs": 1, "norm_groups": 4},
        "labels": [
            {"name": "body", "value": 1, "code": "38266002", "scheme": "SCT",
             "meaning": "Entire body", "enclosing": True},
            {"name": "liver", "value": 2, "code": "10200004", "scheme": "SCT",
             "meaning": "Liver", "enclosing": False},
        ],
        "heads": {"body": ["body"], "liver": ["liver"]},
        "preprocessing": {"modality": "CT", "input_size": 32},
    }


def head_tensors(head: str, classes: int, value: float = 0.1) -> dict[str, np.ndarray]:
    """The tensors of one decoder head in the node network's layout (channels 8, 16)."""
    p = f"heads.{head}."
    return {
        p + "ups.0.weight": np.full((16, 8, 2, 2), value, np.float32),
        p + "ups.0.bias": np.full(8, value, np.float32),
        p + "blocks.0.0.weight": np.full((8, 16, 3, 3), value, np.float32),
        p + "blocks.0.1.weight": np.ones(8, np.float32),
        p + "blocks.0.1.bias": np.zeros(8, np.float32),
        p + "out.weight": np.full((classes, 8, 1, 1), value, np.float32),
        p + "out.bias": np.full(classes, value, np.float32),
    }


def model_tensors() -> dict[str, np.ndarray]:
    return {"encoder.levels.0.0.weight": np.ones((8, 2, 3, 3), np.float32),
            **head_tensors("body", 2), **head_tensors("liver", 2)}


def kidneys() -> heads.NewHead:
    return heads.NewHead("kidneys", heads.parse_labels(json.dumps(KIDNEYS)))


def with_kidneys(seed: int = 5) -> str:
    return heads.config_with_head(json.dumps(model_config()), kidneys(), init_seed=seed,
                                  added_in=1)


# -- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["38266002", "10200004", "18639004", "9846003", "64033007",
                                  "123037004"])
def test_real_snomed_concepts_pass(code: str) -> None:
    assert heads.snomed_concept_problem(code) is None


@pytest.mark.parametrize(("code", "why"), [
    ("18639005", "Verhoeff"), ("9846030", "partition"), ("abc", "digits"),
    ("01234", "6-18 digits"), ("1" * 19, "6-18 digits"), ("", "digits"),
])
def test_bad_snomed_codes_are_named(code: str, why: str) -> None:
    problem = heads.snomed_concept_problem(code)
    assert problem is not None and why in problem


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ('{"name": "x"}', "JSON list"),
    ("[1]", "must be an object"),
    ('[{"name": "a", "value": 4, "code": "18639004"}]', "missing keys ['meaning']"),
    ('[{"name": "a", "value": 4, "code": "18639004", "meaning": "A", "colour": 1}]',
     "unknown keys ['colour']"),
    ('[{"name": "a", "value": true, "code": "18639004", "meaning": "A"}]', "integer"),
    ('[{"name": "a", "value": 4, "code": 18639004, "meaning": "A"}]', "string"),
    ('[{"name": "A b", "value": 4, "code": "18639004", "meaning": "A"}]', "must match"),
    ('[{"name": "a", "value": 300, "code": "18639004", "meaning": "A"}]', "1..255"),
    ('[{"name": "a", "value": 4, "code": "18639005", "meaning": "A"}]', "Verhoeff"),
    ('[{"name": "a", "value": 4, "code": "X", "meaning": "A\\\\B", "scheme": "99LOCAL"}]',
     "meaning"),
])
def test_label_specs_are_checked_with_clear_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=None) as info:
        heads.parse_labels(text)
    assert message in str(info.value)


def test_a_head_needs_labels_and_distinct_ones() -> None:
    with pytest.raises(InvalidRequest, match="at least one label"):
        heads.NewHead("kidneys", ())
    one = heads.NewLabel("kidney_left", 4, "18639004", "Left kidney")
    with pytest.raises(InvalidRequest, match="values repeat"):
        heads.NewHead("kidneys", (one, heads.NewLabel("k2", 4, "9846003", "Right kidney")))
    local = heads.NewLabel("lesion", 9, "L-1", "Lesion", scheme="99LOCAL")
    assert heads.NewHead("lesions", (local,)).num_classes == 2


@pytest.mark.parametrize(("head", "labels", "message"), [
    ("liver", KIDNEYS, "head 'liver' already exists"),
    ("kidneys", [{**KIDNEYS[0], "name": "liver"}], "label 'liver' already exists: it is label "
                                                   "'liver' of head 'liver'"),
    ("kidneys", [{**KIDNEYS[0], "value": 2}], "label value 2 is already used by label 'liver'"),
    ("kidneys", [{**KIDNEYS[0], "code": "10200004"}], "already denotes label 'liver'"),
])
def test_adding_what_the_model_already_has_is_refused(head: str, labels: list, message: str
                                                      ) -> None:  # type: ignore[type-arg]
    new = heads.NewHead(head, heads.parse_labels(json.dumps(labels)))
    with pytest.raises(InvalidRequest) as info:
        heads.config_with_head(json.dumps(model_config()), new, init_seed=1, added_in=1)
    assert message in str(info.value)


def test_config_gains_a_pending_head_that_a_merge_marks_trained() -> None:
    text = with_kidneys(seed=77)
    config = json.loads(text)
    assert config["heads"]["kidneys"] == ["kidney_left", "kidney_right"]
    assert [lab["name"] for lab in config["labels"]][-2:] == ["kidney_left", "kidney_right"]
    assert config["added_heads"] == {"kidneys": {"init_seed": 77, "added_in": 1,
                                                 "trained": False}}
    assert heads.pending_heads(text) == {"kidneys": 3}
    assert heads.mark_trained(text, model_tensors()) == text  # the head is not carried
    trained = heads.mark_trained(text, {**model_tensors(), **head_tensors("kidneys", 3)})
    assert heads.pending_heads(trained) == {}
    assert json.loads(trained)["added_heads"]["kidneys"]["trained"] is True
    with pytest.raises(FailedPrecondition, match="not a tessera-model/1"):
        heads.config_with_head('{"architecture": "unet2d"}', kidneys(), init_seed=1,
                               added_in=1)


# -- the first weights of a new head ------------------------------------------------------
def test_first_weights_of_a_pending_head_are_checked_against_an_existing_head() -> None:
    base, config = model_tensors(), with_kidneys()
    fresh = head_tensors("kidneys", 3)
    assert set(heads.new_head_tensors({**fresh, **head_tensors("liver", 2)}, base, config)) \
        == set(fresh)
    assert heads.new_head_tensors(head_tensors("liver", 2), base, config) == {}
    with pytest.raises(InvalidRequest, match="not in the base generation nor a pending"):
        heads.new_head_tensors(head_tensors("spleen", 2), base, config)
    with pytest.raises(InvalidRequest, match="not in the base generation nor a pending"):
        heads.new_head_tensors(fresh, base, json.dumps(model_config()))  # not added
    wrong = head_tensors("kidneys", 2)  # output layer for 1 label, the head has 2
    with pytest.raises(InvalidRequest, match=r"heads.kidneys.out.*expected float32\[3"):
        heads.new_head_tensors(wrong, base, config)
    partial = dict(fresh)
    del partial["heads.kidneys.ups.0.bias"]
    with pytest.raises(InvalidRequest, match=r"missing \['ups.0.bias'\]"):
        heads.new_head_tensors(partial, base, config)
    nan = {**fresh, "heads.kidneys.out.bias": np.array([0, np.nan, 0], np.float32)}
    with pytest.raises(InvalidRequest, match="non-finite"):
        heads.new_head_tensors(nan, base, config)
    half = {k: v.astype(np.float16) for k, v in fresh.items()}
    with pytest.raises(InvalidRequest, match="float16"):
        heads.new_head_tensors(half, base, config)


@pytest.mark.parametrize("strategy", [agg.FedAsync(), agg.FedBuff(buffer_size=1),
                                      agg.FedAvg(round_size=1)])
def test_the_first_update_of_a_new_head_is_taken_not_diluted(strategy: agg.Strategy) -> None:
    current = model_tensors()
    update = head_tensors("kidneys", 3, value=0.5)
    merged = strategy.merge(current, [agg.Contribution(update, current, 3, 0)])
    for name, value in update.items():
        np.testing.assert_array_equal(merged[name], value)
    for name, value in current.items():  # groups nobody carried do not move
        np.testing.assert_array_equal(merged[name], value)


def test_several_first_updates_are_averaged_by_samples_and_staleness() -> None:
    current = model_tensors()
    a = agg.Contribution(head_tensors("kidneys", 3, 0.0), current, 1, 0)
    b = agg.Contribution(head_tensors("kidneys", 3, 1.0), current, 3, 0)
    c = agg.Contribution(head_tensors("kidneys", 3, 1.0), current, 1, 3)  # stale: weight 1/2
    merged = agg.FedAsync().merge(current, [a, b, c])
    np.testing.assert_allclose(merged["heads.kidneys.out.bias"], 3.5 / 4.5, rtol=1e-6)
    # once the head exists, an update from a node that still had it pending mixes in
    later = agg.FedBuff(buffer_size=1).merge(
        merged, [agg.Contribution(head_tensors("kidneys", 3, 1.0), current, 16, 1)])
    assert merged["heads.kidneys.out.bias"][0] < later["heads.kidneys.out.bias"][0] <= 1.0


# -- the CLI against a hub database ----------------------------------------------------------
def _hub(tmp_path: Path) -> Path:
    toml = tmp_path / "hub.toml"
    toml.write_text(f'[hub]\nhost = "127.0.0.1"\nport = 0\ndata_dir = "{tmp_path / "data"}"\n')
    service = HubService(load_config(toml))
    try:
        service.init_model(save(model_tensors()), json.dumps(model_config()))
    finally:
        service.close()
    return toml


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation_grpc.hub.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})


def _generations(toml: Path) -> list[tuple[int, str, str]]:
    service = HubService(load_config(toml))
    try:
        return [(g.number, g.sha256, g.config_json) for g in service.list_generations()]
    finally:
        service.close()


def test_add_head_publishes_a_generation_with_the_same_tensors(tmp_path: Path) -> None:
    toml = _hub(tmp_path)
    labels = tmp_path / "kidneys.json"
    labels.write_text(json.dumps(KIDNEYS))
    dry = _cli("add-head", "kidneys", "--labels", f"@{labels}", "--hub-config", str(toml),
               "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["heads"]["kidneys"] == ["kidney_left", "kidney_right"]
    assert len(_generations(toml)) == 1  # a dry run writes nothing
    done = _cli("add-head", "kidneys", "--labels", f"@{labels}", "--hub-config",
                str(toml), "--seed", "1234")
    assert done.returncode == 0, done.stderr
    assert "generation 1 adds head kidneys" in done.stdout
    (g0, sha0, _), (g1, sha1, config1) = _generations(toml)
    assert (g0, g1) == (0, 1) and sha1 == sha0  # no weights made at the hub
    assert json.loads(config1)["added_heads"]["kidneys"] == {"init_seed": 1234, "added_in": 1,
                                                             "trained": False}
    service = HubService(load_config(toml))
    try:
        assert service.require_current().number == 1
        assert service.generation(1).strategy == heads.ADD_HEAD_STRATEGY
    finally:
        service.close()


@pytest.mark.parametrize(("name", "labels", "message"), [
    ("liver", json.dumps(KIDNEYS), "head 'liver' already exists"),
    ("kidneys", json.dumps([{**KIDNEYS[0], "value": 2}]), "label value 2 is already used"),
    ("kidneys", json.dumps([{**KIDNEYS[0], "name": "liver"}]), "label 'liver' already exists"),
    ("kidneys", json.dumps([{**KIDNEYS[0], "code": "18639005"}]), "Verhoeff"),
    ("kidneys", "[]", "at least one label"),
    ("kidneys", "{garbage", "not valid JSON"),
    ("Kidneys!", json.dumps(KIDNEYS), "must match"),
])
def test_hostile_add_head_exits_non_zero_with_a_reason_and_writes_nothing(
    tmp_path: Path, name: str, labels: str, message: str
) -> None:
    toml = _hub(tmp_path)
    before = _generations(toml)
    result = _cli("add-head", name, "--labels", labels, "--hub-config", str(toml))
    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split()), result.stdout
    assert "Traceback" not in result.stderr
    assert _generations(toml) == before


def test_add_head_waits_for_no_one_but_refuses_while_a_candidate_is_evaluated(
    tmp_path: Path
) -> None:
    from federation_grpc.hub.store import GenerationRow, GenerationStatus

    config = HubConfig(data_dir=tmp_path / "data", port=0)
    service = HubService(config)
    try:
        service.init_model(save(model_tensors()), json.dumps(model_config()))
        with service.store.session() as session:
            session.add(GenerationRow(number=1, parent=0, sha256=service.generation(0).sha256,
                                      size_bytes=1, config_json="{}",
                                      status=GenerationStatus.CANDIDATE))
        with pytest.raises(FailedPrecondition, match="candidate generation 1"):
            heads.add_head(service.ledger, kidneys())
    finally:
        service.close()
