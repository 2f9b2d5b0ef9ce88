"""Shared fixtures: one real server with two API keys for the server tests (see server_utils.py), and in-process
apps (TestClient) with their own settings."""

from __future__ import annotations

import pytest

from server_utils import Server


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory) -> dict:
    """A keys file holding two keys, 'alice' and 'bob' (only their hashes are in the file)."""
    from ninocast_server.api.auth import add_key

    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return {"file": path, "alice": add_key(path, "alice"), "bob": add_key(path, "bob")}


@pytest.fixture(scope="session")
def server(tmp_path_factory, api_keys) -> Server:
    """A server with API keys and small limits, shared by the tests that do not restart it."""
    data = tmp_path_factory.mktemp("server") / "data"
    srv = Server(data, keys_file=api_keys["file"], max_body_bytes=1_000_000, max_json_bytes=200_000,
                 max_params_per_session=100_000, max_sessions_per_key=50).start()
    yield srv
    srv.stop()


@pytest.fixture()
def make_client(tmp_path):
    """make(**settings) -> a started TestClient on a fresh in-process app (each with its own data folder)."""
    from fastapi.testclient import TestClient

    from ninocast_server.api import create_app
    from ninocast_server.settings import load_settings

    clients = []

    def make(**settings) -> TestClient:
        app = create_app(load_settings(data_dir=tmp_path / f"data{len(clients)}", device="cpu", **settings))
        c = TestClient(app)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)
