"""Start-up: wrong settings stop the server with a message naming them; the keys CLI; docker compose config."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from server_utils import ROOT, cli_cmd, serve_cmd, server_env


def start_fails(tmp_path: Path, *args: str, **settings) -> str:
    settings.setdefault("data_dir", tmp_path / "data")
    r = subprocess.run(serve_cmd(*args), env=server_env(**settings), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    return r.stderr


@pytest.mark.parametrize("settings, mentions", [
    ({"port": "eighty"}, "NINOCAST_PORT"),
    ({"port": "70000"}, "NINOCAST_PORT"),
    ({"device": "gpu"}, "NINOCAST_DEVICE"),
    ({"max_body_bytes": "-1"}, "NINOCAST_MAX_BODY_BYTES"),
    ({"default_nowcaster": "nino_missing"}, "NINOCAST_DEFAULT_NOWCASTER"),
    ({"host": "0.0.0.0"}, "NINOCAST_KEYS_FILE"),
    ({"models_dir": "/nonexistent/models"}, "NINOCAST_MODELS_DIR"),
])
def test_wrong_setting_stops_startup(tmp_path, settings, mentions):
    err = start_fails(tmp_path, **settings)
    assert mentions in err and "Traceback" not in err


def test_toml_file_errors(tmp_path):
    cfg = tmp_path / "ninocast.toml"
    cfg.write_text('port = 8000\nqueue_sise = 3\n')
    assert "queue_sise" in start_fails(tmp_path, "--config", str(cfg))
    cfg.write_text('port = [\n')
    assert str(cfg) in start_fails(tmp_path, "--config", str(cfg))
    assert "does not exist" in start_fails(tmp_path, "--config", str(tmp_path / "none.toml"))


def test_settings_precedence_and_open_mode(tmp_path, monkeypatch):
    from ninocast_server.settings import SettingsError, load_settings

    cfg = tmp_path / "s.toml"
    cfg.write_text('port = 9001\nqueue_size = 7\nhost = "127.0.0.1"\n')
    monkeypatch.setenv("NINOCAST_QUEUE_SIZE", "9")
    s = load_settings(cfg, port=9002)
    assert (s.port, s.queue_size) == (9002, 9) and s.is_open
    with pytest.raises(SettingsError, match="NINOCAST_OPEN_MODE"):
        load_settings(host="0.0.0.0", keys_file=tmp_path / "k.json", open_mode=True)
    assert load_settings(host="0.0.0.0", open_mode=True).is_open
    assert not load_settings(host="0.0.0.0", keys_file=tmp_path / "k.json").is_open
    monkeypatch.delenv("NINOCAST_QUEUE_SIZE")
    cfg.write_text('NINOCAST_PORT = 9003\nQueue_Size = 5\n')  # the variable's name works in the file too
    assert (load_settings(cfg).port, load_settings(cfg).queue_size) == (9003, 5)
    monkeypatch.setenv("NINOCAST_CONFIG", str(cfg))
    assert load_settings().port == 9003 and load_settings().host == "127.0.0.1"  # defaults under the file


@pytest.mark.parametrize("text, mentions", [
    ('port = "eighty"\n', "NINOCAST_PORT"),  # a wrong type names the setting and the value
    ('queue_size = 0\n', "NINOCAST_QUEUE_SIZE"),
    ('open_mode = "maybe"\n', "NINOCAST_OPEN_MODE"),
    ('port = 8000\nport = 8001\n', "ninocast.toml"),  # not TOML: the file is named
    ('[limits]\nqueue_size = 3\n', "unknown setting 'limits'"),
])
def test_toml_values_are_checked(tmp_path, text, mentions):
    from ninocast_server.settings import SettingsError, load_settings

    cfg = tmp_path / "ninocast.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError) as e:
        load_settings(cfg)
    assert mentions in str(e.value)


def test_keys_cli_prints_only_the_key(tmp_path):
    keys = tmp_path / "keys.json"
    cli = cli_cmd("keys")
    env = server_env()
    r = subprocess.run(cli + ["add", "carol", "--keys-file", str(keys)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert r.stdout == key + "\n" and len(key) > 40 and "\n" not in key
    stored = keys.read_text()
    assert key not in stored and json.loads(stored)["keys"][0]["name"] == "carol"
    assert keys.stat().st_mode & 0o077 == 0
    dup = subprocess.run(cli + ["add", "carol", "--keys-file", str(keys)], env=env, capture_output=True, text=True)
    assert dup.returncode == 2 and "exists" in dup.stderr and dup.stdout == ""
    listed = subprocess.run(cli + ["list", "--keys-file", str(keys)], env=env, capture_output=True, text=True)
    assert "carol" in listed.stdout and key not in listed.stdout
    rev = subprocess.run(cli + ["revoke", "carol", "--keys-file", str(keys)], env=env, capture_output=True, text=True)
    assert rev.returncode == 0 and json.loads(keys.read_text())["keys"] == []


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    return None


def test_docker_compose_config():
    compose = _compose()
    if compose is None:
        pytest.skip("docker compose is not installed (neither the docker plugin nor docker-compose)")
    r = subprocess.run(compose + ["-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "NINOCAST_DATA_DIR" in r.stdout and "8000" in r.stdout and "gpu" in r.stdout
    cpu = r.stdout[r.stdout.index("ninocast-cpu:"):]  # the CPU variant, behind its profile
    assert "- cpu" in cpu and "NINOCAST_DEVICE: cpu" in cpu and "whl/cpu" in cpu and "nvidia" not in cpu
