"""Which model serves a routing rule's model name.

In order: a file configured under ``[models]``; a model this node builds itself
(``tessera-head-mr``, under ``<data_dir>/models/<name>/``, by the command
:data:`SITE_BUILT` names); the shipped starter. A site-built model not built yet is a
:class:`ModelNotBuilt`, whose message names the command that builds it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dicom_node.errors import DicomNodeError
from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.bootstrap_data import HEAD_MR_MODEL
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.weights import code_dirs_for, load_model

LOGGER = logging.getLogger(__name__)

STARTER_MODEL = "tessera-abdomen-ct"


# Models whose weights are never shipped (the AAL atlas licence limits redistributing
# derived data): name -> the command that builds them on the node.
SITE_BUILT: dict[str, str] = {HEAD_MR_MODEL: "tessera model bootstrap --data mr"}


class UnknownModel(DicomNodeError):
    """A rule names a model this node does not have; the series cannot be segmented."""


class ModelNotBuilt(UnknownModel):
    """A model the node builds itself has not been built yet."""


class ModelRegistry:
    """Loads models by name once and serves them to inference threads.

    ``paths`` maps model names to weight files; the shipped starter model is always
    known under its own name; a :data:`SITE_BUILT` model is read from ``built_dir``.
    """

    def __init__(self, paths: dict[str, Path] | None = None,
                 built_dir: Path | None = None) -> None:
        self._paths = dict(paths or {})
        self._built_dir = built_dir
        self._loaded: dict[str, tuple[SegmentationNetwork, ModelConfig]] = {}
        self._lock = threading.Lock()
        starter = STARTER_DIR / "model.safetensors"
        self._starter: Path | None = starter if starter.exists() else None

    def get(self, name: str) -> tuple[SegmentationNetwork, ModelConfig]:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            path = self.path(name)
            if path is None and self._starter is not None:
                model, config = load_model(self._starter)
                if config.name == name:
                    self._loaded[name] = (model, config)
                    return model, config
            if path is None:
                raise UnknownModel(f"no model named {name!r} is installed")
            model, config = load_model(path)
            self._loaded[name] = (model, config)
            LOGGER.info("loaded model %s generation %d from %s", name, config.generation, path)
            return model, config

    def path(self, name: str) -> Path | None:
        """The weights file ``name`` is loaded from; None for the shipped starter's name
        (or an unknown one).

        Raises
        ------
        ModelNotBuilt
            ``name`` is a site-built model whose file does not exist yet.
        """
        if name in self._paths:
            return Path(self._paths[name])
        if name in SITE_BUILT and self._built_dir is not None:
            built = self._built_dir / name / "model.safetensors"
            if not built.exists():
                raise ModelNotBuilt(
                    f"model {name!r} is not built on this node yet: run "
                    f"`{SITE_BUILT[name]} --config <this node's configuration>` "
                    f"(it writes {built}), then `tessera node reprocess --refused`")
            return built
        return None

    def source(self, name: str) -> Path:
        """The file ``name`` is loaded from when no local version serves (the shipped
        starter's for its own name).

        Raises
        ------
        ModelNotBuilt
            ``name`` is a site-built model whose file does not exist yet.
        """
        path = self.path(name)
        return path if path is not None else STARTER_DIR / "model.safetensors"

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``configured`` ([models]), ``built`` on this node,
        or ``shipped``."""
        return ("configured" if name in self._paths
                else "built" if name in SITE_BUILT else "shipped")

    def code_dirs(self, name: str) -> tuple[Path, ...]:
        """Where an operator-installed TorchScript file of ``name`` may live: the
        ``torchscript/`` folder beside its configured weights or one level up."""
        path = self._paths.get(name)
        return code_dirs_for(Path(path)) if path is not None else ()

    def loaded_generation(self, name: str) -> int | None:
        """The generation this registry serves for ``name``; None before its first use."""
        with self._lock:
            loaded = self._loaded.get(name)
            return None if loaded is None else loaded[1].generation

    def replace(self, name: str, model: SegmentationNetwork, config: ModelConfig) -> None:
        """Serve a new version from now on (hot swap; in-flight jobs keep the old one)."""
        with self._lock:
            self._loaded[name] = (model, config)
