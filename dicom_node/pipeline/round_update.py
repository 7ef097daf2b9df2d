"""What a round sends to the hub: the round's own change, on the hub generation it
descends from.

A node's round may start from a local version rather than from a hub generation: an
earlier local round not yet replaced by the hub, or (``[federation] adapt``) this
site's fine-tune of the generation (``pipeline.site_adaptation``). The update goes to
the hub against that hub generation ``g`` with this round's ``num_samples``. Sending the
trained weights as they are would hand the hub, besides the round, everything the start
already carried on top of ``g``: earlier rounds the hub has had already, and the site's
fine-tune on its replay buffer. A strategy that adds an update's change (``delta``)
then counts them again at every round, and an averaging one pulls the shared model
towards one site's fine-tune; in ``benchmarks/federated_learning.py`` (delta+adapt,
CT) every update after generation 4 lowered the hub's validation score from 0.86 to
about 0.81 and was refused.

So the update is ``g + (trained - start)``: exactly what this round learned, on the
generation the hub knows (a tensor ``g`` or ``start`` lacks, such as a head this round
trained, is sent as trained). A round that starts from a hub
generation sends its trained weights unchanged. When ``g``'s weights are gone or the
network is not ours (an imported one), the trained weights go as before, and the log
says so.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from dicom_node.errors import DicomNodeError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadUNet, SegmentationNetwork
from dicom_node.learning.weights import load_model
from dicom_node.pipeline.site_adaptation import rebase
from dicom_node.pipeline.versions import hub_base_generation, is_local_generation, version_row

LOGGER = logging.getLogger(__name__)


def round_on_hub_generation(s: Session, name: str, start_generation: int,
                            start: SegmentationNetwork, trained: SegmentationNetwork,
                            config: ModelConfig) -> SegmentationNetwork:
    """The weights to send for a round that ran from ``start`` (version
    ``start_generation``) to ``trained``: the round's change applied to the hub
    generation ``start`` descends from."""
    if not is_local_generation(start_generation):
        return trained
    hub = hub_base_generation(s, name, start_generation)
    row = version_row(s, name, hub) if not is_local_generation(hub) else None
    if row is None or not row.path:
        LOGGER.warning("%s: hub generation %d's weights are not here; the update carries "
                       "everything since it, not only this round", name, hub)
        return trained
    try:
        generation, _ = load_model(row.path)
    except (DicomNodeError, OSError) as exc:
        LOGGER.warning("%s: hub generation %d not loaded (%s); the update carries "
                       "everything since it, not only this round", name, hub, exc)
        return trained
    if not (isinstance(generation, MultiHeadUNet) and isinstance(trained, MultiHeadUNet)):
        return trained  # an imported network: its rounds are sent whole (see the module)
    return moved_onto(generation, start, trained, config)


def moved_onto(generation: SegmentationNetwork, start: SegmentationNetwork,
               trained: MultiHeadUNet, config: ModelConfig) -> MultiHeadUNet:
    """``generation + (trained - start)`` for the floating tensors the three share with
    the same shape; any other tensor as trained (``rebase`` with the roles turned:
    the trained model carried by the generation's difference from the start)."""
    return rebase(trained, config, generation, start)
