"""What every test starts from."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pydicom.config
import pytest

from dicom_node.dicom.requestor import install as install_requestor

_SETTINGS = pydicom.config.settings

# pynetdicom 3.0.4's requestor reactor can take an answer off its queue as an unexpected
# request and wait out its DIMSE timeout (its pause race, dicom_node/dicom/reactor.py).
# The node's SCU installs the fixed reactor when it first sends; the tests' own SCUs get
# it from the start, whatever ran before them in their process (a test_peer_input SCU
# once timed out on its C-ECHO that way in CI: "Received unexpected C-ECHO service
# message").
install_requestor()
_DEFAULT_VALIDATION = (_SETTINGS.reading_validation_mode, _SETTINGS.writing_validation_mode)


@pytest.fixture(autouse=True)
def pydicom_default_validation(request: pytest.FixtureRequest) -> Iterator[None]:
    """pydicom's validation modes are process-wide, and a test or a library can leave
    them strict (``Dataset.to_json_dict(suppress_invalid_tags=True)`` saves the reading
    mode, sets RAISE and puts back what it saw: from several threads at once the last
    put-back can be RAISE; that is what the viewer bridge's metadata did): every test
    starts from pydicom's defaults, so what it reads does not depend on the tests that
    ran before it in its process."""
    _SETTINGS.reading_validation_mode, _SETTINGS.writing_validation_mode = _DEFAULT_VALIDATION
    yield
    left = (_SETTINGS.reading_validation_mode, _SETTINGS.writing_validation_mode)
    if left != _DEFAULT_VALIDATION:  # named in the warnings summary, to be mended there
        warnings.warn(f"{request.node.nodeid} left pydicom's validation modes at {left}",
                      stacklevel=1)


# The files that take longest, longest first (seconds summed per file from a full run's
# --junitxml; those over ~20 s). With ``--dist loadfile`` a worker takes whole files in
# collection order, so a long file collected last (tests/viewer sorts late) leaves the
# other workers idle at the end. Started first, they run beside the many short files,
# and what is left at the end is short.
LONGEST_FIRST = (
    "tests/viewer/test_ohif_save.py",
    "tests/federation_node/test_demo.py",
    "tests/node/test_intake_journal.py",
    "tests/node/test_receivers.py",
    "tests/federation_node/test_harm_refused.py",
    "tests/node/test_mr_model.py",
    "tests/federation_node/test_processes.py",
    "tests/node/test_segmentation.py",
    "tests/corrections/test_deepbet_federation.py",
    "tests/corrections/test_learning_loop.py",
    "tests/federation_node/test_site_adaptation.py",
    "tests/viewer/test_ohif_browser.py",
    "tests/node/test_forward.py",
    "tests/corrections/test_bad_corrections.py",
    "tests/deploy/test_deploy_files.py",
    "tests/corrections/test_viewer_segs.py",
    "tests/node/test_demo.py",
    "tests/test_readme_commands.py",
    "tests/federation_node/test_privacy.py",
    "tests/node/test_config.py",
    "tests/federation_node/test_partial_labels.py",
    "tests/node/test_byom_deepbet.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
