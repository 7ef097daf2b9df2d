"""What a pipeline stage that works on stored series needs, in one constructor."""

from __future__ import annotations

from pathlib import Path

from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore
from dicom_node.store.jobs import JobQueue


class SeriesStage:
    """Base of the stages that read stored series, store results and queue jobs
    (segmentation, correction intake): the index, the files, the instance store, the
    job queue, the node's data directory and its models. Each stage takes its own
    configuration sections besides."""

    def __init__(self, db: Database, files: InstanceFiles, store: InstanceStore,
                 queue: JobQueue, data_dir: Path, models: ModelRegistry) -> None:
        self.db = db
        self.files = files
        self.store = store
        self.queue = queue
        self.data_dir = data_dir
        self.models = models
