"""Server settings: NINOCAST_* environment variables over an optional TOML file over defaults.

Everything is validated at start-up so that a typo stops the server with a message naming the setting, instead of
surfacing as a strange error on the first request hours later.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from . import DEFAULT_NOWCASTER

ENV_PREFIX = "NINOCAST_"
GiB = 1024**3


class SettingsError(ValueError):
    """A setting that cannot work; the message names it (as its environment variable)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("data")
    models_dir: Path | None = None
    keys_file: Path | None = None
    default_nowcaster: str = DEFAULT_NOWCASTER
    device: str = "auto"
    # None = automatic: open (no keys) only on a loopback bind without a keys file.
    open_mode: bool | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- limits
    max_body_bytes: int = Field(4 * GiB, gt=0, description="largest state upload (413 above)")
    max_json_bytes: int = Field(32 * 1024**2, gt=0, description="largest JSON request body (413 above)")
    max_params_per_session: int = Field(2_000_000_000, gt=0)
    max_sessions_per_key: int = Field(100, gt=0)
    disk_quota_per_key: int = Field(200 * GiB, gt=0, description="bytes of states a key may hold (507 above)")
    session_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="idle sessions are deleted after this")
    queue_size: int = Field(64, gt=0, description="nowcasts waiting per server (503 above)")
    memory_budget_bytes: int = Field(32 * GiB, gt=0, description="estimated bytes of queued nowcasts (503 above)")
    max_history: int = Field(1000, gt=0, description="nowcast timings kept per session")
    max_tensors_per_spec: int = Field(10_000, gt=0, description="tensors in a session's spec (422 above)")
    max_name_length: int = Field(512, gt=0, description="characters of a tensor name in a spec (422 above)")
    min_free_disk_bytes: int = Field(GiB, ge=0, description="/readyz reports not ready below this much free space")

    # --- HTTP connections (the uvicorn protocol in api/http_protocol.py)
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this (408)")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="longest pause inside a request body (408)")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="bytes of a request's headers (431 above)")
    max_connections: int = Field(500, gt=0, description="open connections; more are answered 503 and closed")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("default_nowcaster")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _auth_mode(self) -> "Settings":
        if self.keys_file is not None and self.open_mode:
            raise ValueError("NINOCAST_OPEN_MODE=true conflicts with NINOCAST_KEYS_FILE: choose one")
        if self.keys_file is None and self.open_mode is None and not is_loopback(self.host):
            raise ValueError(
                f"binding to {self.host} (not loopback) needs NINOCAST_KEYS_FILE "
                "(or NINOCAST_OPEN_MODE=true to serve without keys)")
        if self.keys_file is None and self.open_mode is False:
            raise ValueError("NINOCAST_OPEN_MODE=false needs NINOCAST_KEYS_FILE: otherwise nobody can authenticate")
        return self

    @property
    def is_open(self) -> bool:
        """No API keys: every request acts as the single local user."""
        return self.keys_file is None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings


class _TomlSource(TomlConfigSettingsSource):
    """The TOML file's values, lowest priority above the defaults; keys may carry the NINOCAST_ prefix, any case."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        return {k.lower().removeprefix("ninocast_"): v for k, v in super()._read_file(file_path).items()}


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Settings from flags (overrides, None = unset) > environment > TOML file (config or NINOCAST_CONFIG)."""
    config = config or os.environ.get(ENV_PREFIX + "CONFIG") or None
    sources: tuple[PydanticBaseSettingsSource, ...] = ()
    if config:
        path = Path(config)
        if not path.is_file():  # the TOML source would silently skip a missing file
            raise SettingsError(f"settings file {path} " + ("is not a file" if path.exists() else "does not exist"))
        try:
            sources = (_TomlSource(Settings, toml_file=path),)
        except (OSError, ValueError) as e:  # ValueError: tomllib's (tomli's on 3.10) TOMLDecodeError
            raise SettingsError(f"settings file {path}: {e}") from None

    class _WithFile(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings) + sources

    try:
        return _WithFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise SettingsError(format_errors(e, config)) from None


def format_errors(e: ValidationError, config: Any = None) -> str:
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        name = ENV_PREFIX + loc[0].upper() if loc else "settings"
        if err["type"] == "extra_forbidden":
            where = f" in {config}" if config else ""
            lines.append(f"unknown setting {loc[0]!r}{where}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if loc and "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{name}: {msg}{got}" if loc else msg)
    return "invalid settings: " + "; ".join(lines)
