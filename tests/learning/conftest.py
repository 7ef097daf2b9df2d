"""Small synthetic CT-like volumes and a tiny model config, so unit tests run in seconds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dicom_node.learning.model_config import ModelConfig, UNetHyperparameters, abdomen_ct_config
from dicom_node.learning.monai_heads import with_monai_unet_encoder

# label values of abdomen_ct_config
BODY, LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT = 1, 2, 3, 4, 5


def toy_volume(
    seed: int = 0, slices: int = 6, rows: int = 48, cols: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """An HU volume and its label map: body ellipse with liver, spleen and two kidneys.

    Image left is patient right (radiological display), as in the phantom.
    """
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:cols]
    r, c = r / rows, c / cols
    image = np.full((slices, rows, cols), -1000.0, dtype=np.float32)
    labels = np.zeros((slices, rows, cols), dtype=np.uint8)
    for k in range(slices):
        jit = rng.uniform(-0.02, 0.02, size=2)

        def ellipse(
            cr: float, cc: float, ar: float, ac: float, jit: np.ndarray = jit
        ) -> np.ndarray:
            return ((r - cr - jit[0]) / ar) ** 2 + ((c - cc - jit[1]) / ac) ** 2 <= 1

        body = ellipse(0.5, 0.5, 0.32, 0.42)
        image[k][body], labels[k][body] = -80, BODY
        for mask, value, hu in (
            (ellipse(0.45, 0.32, 0.14, 0.13), LIVER, 100),
            (ellipse(0.45, 0.70, 0.08, 0.07), SPLEEN, 120),
            (ellipse(0.65, 0.62, 0.06, 0.045), KIDNEY_LEFT, 180),
            (ellipse(0.65, 0.38, 0.06, 0.045), KIDNEY_RIGHT, 180),
        ):
            image[k][mask], labels[k][mask] = hu, value
    image += rng.normal(0, 10, image.shape).astype(np.float32)
    return image, labels


@pytest.fixture
def tiny_config() -> ModelConfig:
    config = abdomen_ct_config(input_size=32)
    return replace(config, hyperparameters=UNetHyperparameters(channels=(8, 16, 32), norm_groups=4))


def with_monai_encoder(config: ModelConfig) -> ModelConfig:
    """``config`` with a small MONAI UNet as the encoder of the same heads."""
    return with_monai_unet_encoder(config, features=8, channels=(8, 16, 32))


@pytest.fixture(params=["unet", "monai-heads"])
def any_heads_config(request: pytest.FixtureRequest, tiny_config: ModelConfig) -> ModelConfig:
    """The tiny config on each architecture with heads: our U-Net, a MONAI encoder."""
    return tiny_config if request.param == "unet" else with_monai_encoder(tiny_config)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
