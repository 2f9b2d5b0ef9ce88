"""Run a real ``ninocast serve`` subprocess on a free loopback port and wait until ``/readyz`` answers 200.

Shared by the server tests (tests/server_utils.py) and ``ninocast bench server``, so there is one copy of the
start/stop logic. Only the standard library and httpx (a client dependency) are imported here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

import ninocast
import ninocast_server

CLIENT_DIR = Path(ninocast.__file__).resolve().parents[1]
SERVICE_DIR = Path(ninocast_server.__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**settings: Any) -> dict[str, str]:
    """This process's environment without its NINOCAST_* variables, with both packages importable and
    NINOCAST_<NAME> set from ``settings`` (None values left unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NINOCAST_")}
    paths = list(dict.fromkeys([str(CLIENT_DIR), str(SERVICE_DIR)]))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({f"NINOCAST_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    return env


def cli_cmd(*args: str) -> list[str]:
    """The ``ninocast`` command, run by this interpreter."""
    return [sys.executable, "-m", "ninocast", *args]


def serve_cmd(*args: str) -> list[str]:
    return cli_cmd("serve", *args)


class ServerProcess:
    """A ``ninocast serve`` subprocess; ``url`` once started. Settings are NINOCAST_* names without the prefix.

    Its output goes to ``log`` (beside ``data_dir`` unless given). ``stop`` sends SIGTERM (graceful), ``kill``
    SIGKILL (no shutdown handlers, no flushing). Usable as a context manager.
    """

    def __init__(self, data_dir: Path, port: int | None = None, log: Path | None = None, cwd: Path | None = None,
                 **settings: Any) -> None:
        data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"host": "127.0.0.1", "port": self.port, "data_dir": data_dir, "device": "cpu",
                         "log_level": "warning", **settings}
        self.proc: subprocess.Popen | None = None
        self.log = Path(log) if log else data_dir.parent / f"server-{self.port}.log"
        self.cwd = cwd
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(serve_cmd(), env=server_env(**self.settings), cwd=self.cwd,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def healthy(self, timeout: float = 5.0) -> bool:
        """``GET /healthz`` answers 200 within ``timeout`` seconds (a test's check that a bad request left the
        server serving)."""
        try:
            return httpx.get(self.url + "/healthz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def proc_status(self, field: str) -> int | None:
        """A ``/proc/<pid>/status`` memory field (e.g. VmHWM, VmRSS) in bytes; None when unreadable."""
        if not self.proc:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            return None
        return None

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
