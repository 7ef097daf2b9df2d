"""``tessera model list`` and a very short ``tessera model bootstrap``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from dicom_node.learning import bootstrap_3d, bootstrap_data
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import build_model
from dicom_node.learning.weights import load_model, save_model
from viewer_bridge.main import app

from .conftest import toy_volume

runner = CliRunner()


def test_model_list_shows_every_version(tiny_config: ModelConfig, tmp_path: Path) -> None:
    for gen in (0, 3):
        cfg = tiny_config.with_generation(gen)
        save_model(build_model(cfg), cfg, tmp_path / f"gen{gen}" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    result = runner.invoke(app, ["model", "list", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["generation"] for r in rows] == [0, 3]
    assert rows[0]["heads"]["kidneys"] == ["kidney_left", "kidney_right"]
    table = runner.invoke(app, ["model", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "tessera-abdomen-ct" in table.output


def test_model_list_of_an_empty_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", "list", str(tmp_path)])
    assert result.exit_code == 0 and "no models" in result.output


def _toy_subjects(slices: int, size: int, spacing: tuple[float, float, float]
                  ) -> Callable[[str, int, int], SimpleNamespace]:
    """A phantom source's ``subject`` that makes small toy volumes instead."""

    def subject(site: str, index: int, seed: int) -> SimpleNamespace:
        image, labels = toy_volume(seed=1000 * seed + index, slices=slices, rows=size,
                                   cols=size)
        return SimpleNamespace(image=image, labels=labels, spacing=spacing)

    return subject


def test_bootstrap_command_on_toy_subjects(tmp_path: Path, monkeypatch) -> None:
    ct = bootstrap_data.SOURCES["ct"]
    monkeypatch.setitem(bootstrap_data.SOURCES, "ct",
                        replace(ct, subject=_toy_subjects(4, 40, (3.0, 1.5, 1.5))))
    args = [
        "model",
        "bootstrap",
        "--subjects",
        "2",
        "--held-out",
        "1",
        "--time-budget",
        "60",
        "--input-size",
        "32",
        "--epochs",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "held-out Dice" in result.output and "kidney_right" in result.output
    assert "2 full epochs on 8 slices" in result.output
    _, config = load_model(tmp_path / "model.safetensors")
    assert config.preprocessing.input_size == 32


def test_bootstrap_of_the_starters_heads_on_a_monai_encoder(tmp_path: Path, monkeypatch) -> None:
    ct = bootstrap_data.SOURCES["ct"]
    monkeypatch.setitem(bootstrap_data.SOURCES, "ct",
                        replace(ct, subject=_toy_subjects(4, 40, (3.0, 1.5, 1.5))))
    args = ["model", "bootstrap", "--subjects", "2", "--held-out", "1", "--time-budget", "60",
            "--input-size", "32", "--epochs", "1", "--arch", "unet2d-monai",
            "--out", str(tmp_path)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "held-out Dice" in result.output and "1 full epochs on 8 slices" in result.output
    _, config = load_model(tmp_path / "model.safetensors")
    assert config.architecture == "monai-heads:UNet" and config.spatial_dims == 2
    assert config.head_names == ct.config(32).head_names


@pytest.mark.slow
def test_bootstrap_trains_saves_and_reports_dice(tmp_path: Path) -> None:
    args = [
        "model",
        "bootstrap",
        "--subjects",
        "1",
        "--held-out",
        "1",
        "--time-budget",
        "3",
        "--input-size",
        "32",
        "--epochs",
        "1",
        "--seed",
        "5",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    for label in ("body", "liver", "spleen", "kidney_left", "kidney_right", "mean"):
        assert label in result.output
    _, config = load_model(tmp_path / "model.safetensors")
    assert config.generation == 0 and config.preprocessing.input_size == 32
    assert (tmp_path / "model.json").exists()


def test_bootstrap_of_a_3d_starter(tmp_path: Path, monkeypatch) -> None:
    ct = bootstrap_data.SOURCES["ct"]
    monkeypatch.setitem(bootstrap_data.SOURCES, "ct",
                        replace(ct, subject=_toy_subjects(16, 48, (4.0, 4.0, 4.0))))
    monkeypatch.setattr(bootstrap_3d, "ROI", (16, 16, 16))
    base = ["model", "bootstrap", "--subjects", "2", "--held-out", "1", "--time-budget", "3"]
    result = runner.invoke(app, [*base, "--arch", "segresnet", "--out", str(tmp_path)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "held-out Dice" in result.output and "on 2 volumes" in result.output
    _, config = load_model(tmp_path / "model.safetensors")
    assert (config.architecture, config.spatial_dims) == ("monai:SegResNet", 3)
    assert [lab.name for lab in config.labels] == [
        lab.name for lab in bootstrap_data.SOURCES["ct"].config(32).labels]
    assert config.preprocessing.volume is not None
    assert config.preprocessing.volume.roi_size == (16, 16, 16)

    no_out = runner.invoke(app, [*base, "--arch", "dynunet"])
    assert no_out.exit_code == 2 and "needs --out" in no_out.output
    unknown = runner.invoke(app, [*base, "--arch", "vnet", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 1 and "unknown --arch 'vnet'" in unknown.output
    mr = runner.invoke(app, [*base, "--data", "mr", "--arch", "segresnet",
                             "--out", str(tmp_path / "mr")])
    assert mr.exit_code == 1 and "--data ct only" in mr.output
