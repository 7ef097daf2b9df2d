"""What every test starts from."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pydicom.config
import pytest

_SETTINGS = pydicom.config.settings
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


# The files that take longest (minutes; measured with --durations), in that order. With
# ``--dist loadfile`` a worker takes whole files in collection order, so a long file
# collected last (tests/viewer sorts late) leaves the other workers idle at the end.
# Started first, they run beside the many short files instead.
LONGEST_FIRST = (
    "tests/viewer/test_ohif_save.py",
    "tests/federation_node/test_demo.py",
    "tests/node/test_intake_journal.py",
    "tests/node/test_receivers.py",
    "tests/federation_node/test_processes.py",
    "tests/corrections/test_learning_loop.py",
    "tests/node/test_mr_model.py",
    "tests/federation_node/test_privacy.py",
    "tests/deploy/test_deploy_files.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
