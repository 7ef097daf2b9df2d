"""Configuration: the example file loads, bad keys fail at start-up naming the key,
environment overrides beat the file and command-line flags beat both."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.config import EXAMPLE_CONFIG, NodeConfig, load_config
from dicom_node.errors import ConfigError
from tests.node.conftest import (
    NodeProcess,
    echoscu,
    node_config_data,
    tessera,
    write_node_config,
)
from tests.peers import free_port


def test_init_writes_a_config_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "node.toml"
    result = tessera("node", "init", str(path))
    assert result.returncode == 0, result.stderr
    assert path.read_text() == EXAMPLE_CONFIG
    cfg = load_config(path, env={})
    assert cfg.dicom.port == 11112
    assert cfg.rules and cfg.rules[0].destinations == ("pacs",)
    # A second init refuses to overwrite.
    again = tessera("node", "init", str(path))
    assert again.returncode != 0 and "exists" in again.stderr


BAD = {
    "unknown-key": ("[dicom]\nprot = 104\n", ["dicom.prot"]),
    "wrong-type": ('[dicom]\nport = "eleven"\n', ["dicom.port"]),
    "out-of-range": ("[dicom]\nport = 70000\n", ["dicom.port"]),
    "no-receiver": ("[dicom]\nreceivers = 0\n", ["dicom.receivers"]),
    "unknown-destination": (
        '[[rules]]\nname = "r"\naction = "forward"\ndestinations = ["nowhere"]\n',
        ["rules[0].destinations", "nowhere"]),
    "segment-without-model": (
        '[destinations.pacs]\nae_title = "P"\nhost = "127.0.0.1"\nport = 104\n'
        '[[rules]]\nname = "r"\naction = "segment"\ndestinations = ["pacs"]\n',
        ["rules", "model"]),
    "bad-ae-title": ('[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', ["dicom.ae_title"]),
    "bad-regex": ('[destinations.pacs]\nae_title = "P"\nhost = "127.0.0.1"\nport = 104\n'
                  '[[rules]]\nname = "r"\ndestinations = ["pacs"]\n'
                  '[rules.match]\nseries_description = "(unclosed"\n',
                  ["series_description"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_naming_the_key(case: str, tmp_path: Path) -> None:
    text, names = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "node"}"\n' + text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("case", ["unknown-key", "unknown-destination"])
def test_serve_exits_non_zero_on_bad_config(case: str, tmp_path: Path) -> None:
    text, names = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "node"}"\n' + text)
    result = tessera("node", "serve", "--config", str(path))
    assert result.returncode != 0
    for name in names:
        assert name in result.stderr
    assert not (tmp_path / "node").exists(), "nothing may start on a bad configuration"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write_node_config(tmp_path / "n.toml", node_config_data(tmp_path / "a"))
    env = {"TESSERA_DICOM__PORT": "4000", "TESSERA_DICOM__AE_TITLE": "FROMENV",
           "TESSERA_ASSEMBLER__QUIET_PERIOD_S": "7.5", "UNRELATED": "x"}
    cfg = load_config(path, env=env)
    assert (cfg.dicom.port, cfg.dicom.ae_title) == (4000, "FROMENV")
    assert cfg.assembler.quiet_period_s == 7.5
    assert cfg.node.data_dir == tmp_path / "a"
    cfg = load_config(path, env=env, overrides={"dicom.port": 5000, "dicom.ae_title": None,
                                                "node.data_dir": str(tmp_path / "b")})
    assert (cfg.dicom.port, cfg.dicom.ae_title) == (5000, "FROMENV")
    assert cfg.node.data_dir == tmp_path / "b"
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_config(path, env={"TESSERA_DICOM__PORT": "many"})


@pytest.mark.peers
def test_env_override_and_cli_flags_win_over_the_file(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
) -> None:
    config = write_node_config(tmp_path / "n.toml", node_config_data(tmp_path / "file-dir"))
    env_port = free_port()
    env = dict(os.environ, TESSERA_DICOM__PORT=str(env_port))
    from_env = node_process(config, env=env)
    assert from_env.port == env_port
    assert echoscu(env_port).returncode == 0
    from_env.stop()

    flag_port = free_port()
    flag_dir = tmp_path / "flag-dir"
    from_flags = node_process(config, "--ae-title", "FLAGAE", "--port", str(flag_port),
                              "--data-dir", str(flag_dir), env=env)
    assert from_flags.port == flag_port
    assert from_flags.listening["ae_title"] == "FLAGAE"
    assert echoscu(flag_port, called_ae="FLAGAE").returncode == 0
    assert (flag_dir / "node.db").exists()


# -- [learning.round] / [learning.rehearsal]: the keys that moved there ---------------------
def test_renamed_learning_keys_still_load_with_a_warning_naming_the_new_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[learning]\nepochs = 2\ntime_budget_s = 7\nrehearsal_site = ""\n'
                    "validation_every = 3\n")
    with caplog.at_level(logging.WARNING, logger="dicom_node.config.learning"):
        config = load_config(path, env={"TESSERA_LEARNING__REHEARSAL_MARGIN": "0.1"})
    learning = config.learning
    assert (learning.round.epochs, learning.round.time_budget_s) == (2, 7.0)
    assert (learning.rehearsal.site, learning.rehearsal.margin) == ("", 0.1)
    assert learning.validation_every == 3
    warned = caplog.text
    for old, new in (("epochs", "[learning.round] epochs"),
                     ("rehearsal_site", "[learning.rehearsal] site"),
                     ("rehearsal_margin", "[learning.rehearsal] margin")):
        assert f"[learning] {old} is deprecated" in warned and new in warned


def test_the_new_learning_sections_load_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[learning.round]\nepochs = 2\n[learning.rehearsal]\nsite = "B"\n')
    with caplog.at_level(logging.WARNING):
        config = load_config(path, env={"TESSERA_LEARNING__ROUND__DISTILL_WEIGHT": "0"})
    assert (config.learning.round.epochs, config.learning.rehearsal.site) == (2, "B")
    assert config.learning.round.distill_weight == 0.0
    assert "deprecated" not in caplog.text


def test_an_old_and_a_new_name_for_one_key_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[learning]\nepochs = 2\n[learning.round]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"epochs and round\.epochs are both set"):
        load_config(path, env={})


def test_a_learning_section_is_the_policy_it_configures(tmp_path: Path) -> None:
    config = NodeConfig.model_validate({"learning": {"round": {"epochs": 3}}})
    policy = config.learning.round.policy()
    assert (policy.epochs, policy.encoder_lr_scale, policy.replay_fraction) == (3, 0.01, 0.5)
    assert config.learning.rehearsal.plan().site == "A"
    path = tmp_path / "node.toml"
    path.write_text("[learning.round]\nencoder_lr_scale = 2\n")
    with pytest.raises(ConfigError, match=r"learning\.round: encoder_lr_scale must be in"):
        load_config(path, env={})
