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
    """pydicom's validation modes are process-wide, and a test (or a library, such as
    dicomweb_client's file client, which sets RAISE around a call and leaves it there if
    the call raises) can leave them strict: every test starts from pydicom's defaults,
    so what it reads does not depend on the tests that ran before it in its process."""
    _SETTINGS.reading_validation_mode, _SETTINGS.writing_validation_mode = _DEFAULT_VALIDATION
    yield
    left = (_SETTINGS.reading_validation_mode, _SETTINGS.writing_validation_mode)
    if left != _DEFAULT_VALIDATION:  # named in the warnings summary, to be mended there
        warnings.warn(f"{request.node.nodeid} left pydicom's validation modes at {left}",
                      stacklevel=1)
