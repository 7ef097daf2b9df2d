"""``tessera model import``: MONAI bundles and TorchScript files; every malformed input
refused with a clear reason and nothing written (issue 23)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn
from typer.testing import CliRunner

from dicom_node.learning.errors import WeightsError
from dicom_node.learning.external import sha256_file
from dicom_node.learning.external_training import train_external
from dicom_node.learning.model_import import ModelImportError, import_bundle, import_torchscript
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.weights import (
    apply_groups,
    extract_groups,
    load_model,
    model_from_bytes,
    model_to_bytes,
)
from dicom_node.pipeline.hub_generations import HubGenerationError, serve_hub_generation
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.store.db import Database
from viewer_bridge.main import app

NET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
            "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def make_bundle(root: Path, *, channel_def: dict[str, str] | None = None,
                target: str = "monai.networks.nets.UNet", weights: bool = True,
                extra_args: dict[str, Any] | None = None) -> tuple[Path, UNet]:
    """A bundle laid out as MONAI writes one, with a state dict from a real UNet."""
    torch.manual_seed(3)
    net = UNet(**NET_ARGS).eval()
    bundle = root / "spleen_ct_segmentation"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    inference = {
        "num_classes": 2,
        "network_def": {"_target_": target, "spatial_dims": 3, "in_channels": 1,
                        "out_channels": "@num_classes", "channels": [8, 16, 32],
                        "strides": [2, 2], "num_res_units": 1, **(extra_args or {})},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32],
                    "sw_batch_size": 4, "overlap": 0.5},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    metadata = {"name": "Spleen CT segmentation", "network_data_format": {
        "inputs": {"image": {"modality": "CT", "num_channels": 1}},
        "outputs": {"pred": {"channel_def": channel_def or {"0": "background",
                                                            "1": "spleen"}}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    if weights:
        torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle, net


def written(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_bundle_becomes_a_model_with_the_same_outputs(tmp_path: Path) -> None:
    bundle, net = make_bundle(tmp_path)
    out = tmp_path / "models"
    result = import_bundle(bundle, out)
    config = result.config
    assert config.name == "spleen-ct-segmentation"
    assert config.architecture == "monai:UNet"
    assert [(lab.name, lab.value, lab.code) for lab in config.labels] == [
        ("spleen", 1, "78961009")]
    vp = config.preprocessing.volume
    assert vp is not None and vp.orientation == "RAS" and vp.spacing == (1.5, 1.5, 2.0)
    assert vp.roi_size == (32, 32, 32) and vp.overlap == 0.5
    assert [s.op for s in vp.intensity] == ["window", "affine"]
    model, loaded = load_model(result.path)
    assert loaded == config
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x)["network"], net(x))


def test_pickle_with_code_is_refused_and_nothing_written(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))  # unpickling would create the file

    for save in (pickle.dump, torch.save):
        with (bundle / "models" / "model.pt").open("wb") as fh:
            save({"weight": Payload()}, fh)
        out = tmp_path / "models"
        with pytest.raises(ModelImportError, match="refused, not a plain state dict"):
            import_bundle(bundle, out)
        assert not marker.exists()
        assert written(out) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": False}, "no weights"),
    ({"channel_def": {"0": "background", "1": "spleen", "2": "liver"}}, "output channels"),
    ({"channel_def": {"0": "background", "1": "tumour core"}}, "not in the label table"),
    ({"target": "os.system"}, "only classes of monai.networks.nets"),
    ({"target": "monai.networks.nets.Classifier"}, "not an allowed MONAI network"),
    ({"extra_args": {"dropout": "$__import__('os').getpid()"}}, "is code; refused"),
    ({"extra_args": {"channels": [8, 16, 64]}}, "does not fit network_def"),
])
def test_malformed_bundles_are_refused_and_nothing_written(
        tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    bundle, _ = make_bundle(tmp_path, **kwargs)
    out = tmp_path / "models"
    with pytest.raises(ModelImportError, match=message):
        import_bundle(bundle, out)
    assert written(out) == []


def test_unknown_label_is_coded_by_labels_json(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path, channel_def={"0": "background", "1": "tumour core"})
    labels = {"1": {"name": "tumour_core", "code": "108369006", "meaning": "Neoplasm"}}
    result = import_bundle(bundle, tmp_path / "models", labels=labels)
    assert result.config.labels[0].code == "108369006"


class TinyScripted(nn.Module):
    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x))).softmax(dim=1)


DESCRIPTION = {"modality": "MR", "spatial_dims": 3, "in_channels": 1,
               "output": "probabilities", "labels": {"1": "brain"},
               "preprocessing": {"orientation": "RAS", "roi_size": [32, 32, 32],
                                 "intensity": [{"op": "percentiles", "lower": 1,
                                                "upper": 99}]}}


def scripted(tmp_path: Path, out_channels: int = 2) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "vendor-brain.pt"
    torch.jit.script(TinyScripted(out_channels)).save(str(path))
    return path


def test_torchscript_import_installs_code_locally_and_federates_weights_only(
        tmp_path: Path) -> None:
    script = scripted(tmp_path)
    out = tmp_path / "node-a"
    result = import_torchscript(script, DESCRIPTION, out, name="vendor-brain")
    sha = sha256_file(script)
    assert result.config.architecture == f"torchscript:{sha}"
    assert result.torchscript == out / "torchscript" / f"{sha}.pt"
    model, config = load_model(result.path)
    names = set(model.state_dict())
    assert names == {"network.conv.weight", "network.conv.bias",
                     "network.head.weight", "network.head.bias"}
    # What the hub gets and sends: safetensors by parameter name; another node with the
    # same file installed serves the merged weights, one without it refuses them.
    with torch.no_grad():
        model.network.head.bias.add_(1.0)  # type: ignore[union-attr]
    data = model_to_bytes(model, config)
    node_b = tmp_path / "node-b"
    with pytest.raises(WeightsError, match="not installed on this node"):
        model_from_bytes(data, code_dirs=[node_b])
    import_torchscript(script, DESCRIPTION, node_b, name="vendor-brain")
    served, _ = model_from_bytes(data, code_dirs=[node_b])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(served(x)["network"], model(x)["network"])
    assert not data.startswith(b"PK")  # never the scripted archive itself


def test_a_round_on_imported_torchscript_updates_its_weights_by_name(tmp_path: Path) -> None:
    """A correction trains the scripted network (Dice-CE); the update is its state dict by
    parameter name, which a second node with the same file installed applies."""
    script = scripted(tmp_path)
    model, config = load_model(import_torchscript(script, DESCRIPTION, tmp_path / "a",
                                                  name="vendor-brain").path)
    before = extract_groups(model, ["network"])
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (16, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:12, 6:18, 6:18] = 1
    image[labels == 1] += 3
    sample = VolumeSample(image, labels, frozenset({"brain"}), affine=np.eye(4))
    report = train_external(model, config, [sample],
                            TrainingPolicy(epochs=3, learning_rate=1e-2))
    assert report.steps == 3 and report.trained_heads == ("network",)
    update = extract_groups(model, ["network"])
    assert set(update) == set(before) and all(k.startswith("network.") for k in update)
    assert any(not np.array_equal(before[k], update[k]) for k in update)
    node_b, _ = load_model(import_torchscript(script, DESCRIPTION, tmp_path / "b",
                                              name="vendor-brain").path)
    assert apply_groups(node_b, config, update) == {"network"}
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(node_b(x)["network"], model(x)["network"])


def test_torchscript_whose_installed_file_changed_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "models"
    result = import_torchscript(scripted(tmp_path), DESCRIPTION, out, name="vendor-brain")
    assert result.torchscript is not None
    result.torchscript.write_bytes(result.torchscript.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="sha256 is"):
        load_model(result.path)


@pytest.mark.parametrize(("description", "message"), [
    ({**DESCRIPTION, "labels": {"1": "brain", "2": "spleen"}}, "output channels"),
    ({**DESCRIPTION, "spatial_dims": None}, "spatial_dims"),
    ({**DESCRIPTION, "preprocessing": {"orientation": "LPI"}}, "orientation"),
])
def test_malformed_torchscript_imports_write_nothing(
        tmp_path: Path, description: dict[str, Any], message: str) -> None:
    out = tmp_path / "models"
    with pytest.raises(ModelImportError, match=message):
        import_torchscript(scripted(tmp_path), description, out)
    assert written(out) == []


def test_a_pickle_is_not_taken_for_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    out = tmp_path / "models"
    with pytest.raises(ModelImportError, match="not a TorchScript module"):
        import_torchscript(path, DESCRIPTION, out)
    assert written(out) == []


def test_cli_imports_a_bundle_and_reports_refusals(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path)
    out = tmp_path / "models"
    runner = CliRunner()
    ok = runner.invoke(app, ["model", "import", str(bundle), "--out", str(out),
                             "--name", "spleen"])
    assert ok.exit_code == 0, ok.output
    assert (out / "spleen" / "model.safetensors").is_file()
    listed = runner.invoke(app, ["model", "list", str(out), "--json"])
    assert json.loads(listed.output)[0]["architecture"] == "monai:UNet"
    script = scripted(tmp_path)
    refused = runner.invoke(app, ["model", "import", str(script), "--out", str(out)])
    assert refused.exit_code == 1 and "needs --labels" in refused.output
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(DESCRIPTION))
    ok = runner.invoke(app, ["model", "import", str(script), "--out", str(out),
                             "--labels", str(labels)])
    assert ok.exit_code == 0, ok.output
    assert np.array([p.suffix for p in written(out / "torchscript")]).tolist() == [".pt"]


def test_hub_generation_of_torchscript_serves_only_where_the_file_is_installed(
        tmp_path: Path) -> None:
    """What a node does with a downloaded generation (bytes from the hub): rebuilt from
    its own installed file; a node without it refuses the generation with the reason."""
    script = scripted(tmp_path)
    source = import_torchscript(script, DESCRIPTION, tmp_path / "a", name="vendor-brain")
    model, config = load_model(source.path)
    with torch.no_grad():
        model.network.head.bias.add_(0.5)  # type: ignore[union-attr]
    data = model_to_bytes(model, config.with_generation(4))
    for node, installed in (("b", True), ("c", False)):
        models_dir = tmp_path / node / "models"
        weights = models_dir / "vendor-brain" / "model.safetensors"
        if installed:  # the operator's import on this node
            import_torchscript(script, DESCRIPTION, models_dir, name="vendor-brain")
        registry = ModelRegistry({"vendor-brain": weights})
        registry.replace("vendor-brain", model, config)
        db = Database(f"sqlite:///{tmp_path / node / 'node.db'}")
        db.create_schema()
        try:
            if installed:
                serve_hub_generation(db, registry, "vendor-brain", data, generation=4,
                                     parent=0, config_json=config.to_json(),
                                     models_dir=models_dir)
                served, served_config = registry.get("vendor-brain")
                assert served_config.generation == 4
                x = torch.randn(1, 1, 16, 16, 16)
                with torch.inference_mode():
                    torch.testing.assert_close(served(x)["network"], model(x)["network"])
            else:
                with pytest.raises(HubGenerationError, match="not installed on this node"):
                    serve_hub_generation(db, registry, "vendor-brain", data, generation=4,
                                         parent=0, config_json=config.to_json(),
                                         models_dir=models_dir)
        finally:
            db.dispose()
