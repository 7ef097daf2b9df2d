"""``[inference] device`` / ``[learning] device`` (auto / cpu / cuda) and AMP on CUDA;
nothing here needs a GPU (issue 23)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.config import ConfigError, load_config
from dicom_node.learning.device import autocast, on_device, resolve_device
from dicom_node.learning.errors import LearningError
from dicom_node.learning.model_config import abdomen_ct_config
from dicom_node.learning.network import build_model
from dicom_node.learning.volume_inference import segment_any
from dicom_node.pipeline.training_samples import policy_of


def test_auto_is_cuda_only_where_torch_sees_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_is_a_clear_error() -> None:
    with pytest.raises(LearningError, match="no CUDA device"):
        resolve_device("cuda")


def test_devices_are_configured_per_section(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[inference]\ndevice = "cpu"\n'
                    'amp = false\n[learning]\ndevice = "cpu"\n')
    config = load_config(path, env={})
    assert (config.inference.device, config.inference.amp) == ("cpu", False)
    assert policy_of(config.learning).device == "cpu"
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[inference]\ndevice = "gpu"\n')
    with pytest.raises(ConfigError, match=r"inference\.device"):
        load_config(path, env={})


def test_amp_changes_nothing_on_the_cpu_and_the_shared_model_stays_put() -> None:
    config = abdomen_ct_config(input_size=32)
    torch.manual_seed(0)
    model = build_model(config)
    assert on_device(model, torch.device("cpu")) is model
    assert isinstance(autocast(torch.device("cpu"), True), type(autocast(
        torch.device("cpu"), False)))
    volume = np.random.default_rng(0).normal(0, 200, (3, 40, 40)).astype(np.float32)
    plain = segment_any(model, config, volume, device="cpu", amp=False)
    amp = segment_any(model, config, volume, device="cpu", amp=True)
    np.testing.assert_array_equal(plain.labels, amp.labels)
    assert next(model.parameters()).device.type == "cpu"
