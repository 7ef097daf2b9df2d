"""Every error Tessera raises on purpose derives from one root, ``TesseraError``, so a
caller can tell our refusals from bugs and from other libraries' errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import dicom_node
import federation_grpc
import viewer_bridge
from federation_grpc.errors import TesseraError

SKIP = ("migrations", "_proto")


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for package in (dicom_node, federation_grpc, viewer_bridge):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if any(part in info.name.split(".") for part in SKIP) or info.name.endswith(
                    "__main__"):
                continue
            module = importlib.import_module(info.name)
            found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                      if issubclass(obj, BaseException) and obj.__module__ == module.__name__]
    return found


def test_the_walk_finds_our_errors() -> None:
    names = {e.__name__ for e in project_exceptions()}
    assert {"DicomNodeError", "FederationError", "ExportFailed", "LeaseLost"} <= names


@pytest.mark.parametrize("error", project_exceptions(), ids=lambda e: e.__qualname__)
def test_every_error_derives_from_tessera_error(error: type[BaseException]) -> None:
    assert issubclass(error, TesseraError), f"{error.__module__}.{error.__qualname__}"
