"""The hub's TOML file: what it does not know is refused with the name, never ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.config import EXAMPLE_CONFIG, load_config


def test_the_example_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(EXAMPLE_CONFIG)
    assert load_config(path, env={}).port == 50051


@pytest.mark.parametrize(("text", "named"), [
    ('data_dir = "/srv/hub"\n', "data_dir"),  # above every section: would be ignored
    ('[hub]\ndata_dir = "x"\n[gates]\nvalidation_margin = 0.1\n', "gates"),
    ('[gate]\nvalidation_margn = 0.1\n', "validation_margn"),
    ('gate = 3\n', "[gate] must be a table"),
])
def test_unknown_sections_and_keys_are_refused_by_name(tmp_path: Path, text: str,
                                                       named: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, env={})
