"""Configuration loading and errors; the master secret and derived keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node.config import load_settings
from node.config_template import render
from node.errors import ConfigError, SecretError
from node.keys import NodeKeys, create_master_secret, load_keys


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fednode.toml"
    path.write_text(text)
    return path


def test_template_loads_and_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, render(peers=[("PACS", "10.1.2.3")]))
    s = load_settings(cfg)
    assert s.data_dir == tmp_path / "fednode-data"
    assert s.secret_path == tmp_path / "fednode-data" / "master.key"
    assert s.database_url == f"sqlite:///{tmp_path / 'fednode-data' / 'fednode.db'}"
    assert [(p.ae_title, p.host) for p in s.dicom.peers] == [("PACS", "10.1.2.3")]


def test_example_config_in_deploy_is_the_rendered_template() -> None:
    example = Path(__file__).parents[2] / "deploy" / "fednode.example.toml"
    assert example.read_text() == render(peers=[("PACS", "10.0.0.5")])


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, render(port=11112))
    monkeypatch.setenv("FEDNODE_DICOM__PORT", "4242")
    monkeypatch.setenv("FEDNODE_WORKERS__LANES__INGEST__COUNT", "7")
    s = load_settings(cfg)
    assert s.dicom.port == 4242 and s.workers.lanes["ingest"].count == 7


def test_bad_value_names_key_value_and_fix(tmp_path: Path) -> None:
    cfg = write(tmp_path, render().replace("port = 11112", "port = 99999"))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    msg = str(info.value)
    assert "dicom.port" in msg and "99999" in msg and "1-65535" in msg
    assert "FEDNODE_DICOM__PORT" in msg and str(cfg) in msg


def test_unknown_key_is_reported(tmp_path: Path) -> None:
    cfg = write(tmp_path, render().replace("[workers]", "[workers]\ncuont = 3"))
    with pytest.raises(ConfigError, match=r"workers\.cuont.*unknown key"):
        load_settings(cfg)


def test_bad_ae_title(tmp_path: Path) -> None:
    cfg = write(tmp_path, render(ae_title="THIS_TITLE_IS_TOO_LONG"))
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings(cfg)


def test_toml_syntax_error(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[dicom\nport = 1")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(cfg)


def test_missing_explicit_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_database_password_is_masked(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, render().replace('url = ""', 'url = "postgresql+psycopg://u:s3cret@db/x"')
    )
    shown = load_settings(cfg).redacted()
    assert "s3cret" not in str(shown) and shown["database"]["url"].startswith(
        "postgresql+psycopg://u:***@"
    )


def test_master_secret_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "d" / "master.key"
    create_master_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    before = path.read_bytes()
    with pytest.raises(SecretError, match="never overwrites"):
        create_master_secret(path)
    assert path.read_bytes() == before


def test_loose_secret_permissions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    create_master_secret(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_keys(path)


def test_keys_are_distinct_deterministic_and_redacted() -> None:
    master = bytes(range(32))
    a, b = NodeKeys.from_master(master), NodeKeys.from_master(master)
    assert a == b
    assert len({a.spool, a.vault, a.site}) == 3
    assert NodeKeys.from_master(bytes(32)).site != a.site
    assert "redacted" in repr(a) and a.site.hex() not in repr(a)
