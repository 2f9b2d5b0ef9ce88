"""ServiceError: a request the store or the queue refuses, with the HTTP status and a short code for the client."""

from __future__ import annotations


class ServiceError(Exception):
    """Refused request: ``status`` (HTTP), ``code`` (short, stable) and ``detail`` (what and where)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def not_found(session_id: str) -> ServiceError:
    # The same answer whether the session never existed or belongs to another key: no id probing.
    return ServiceError(404, "session_not_found", f"no session {session_id!r} for this API key")


def quota_exceeded(left: int) -> ServiceError:
    return ServiceError(507, "disk_quota_exceeded",
                        f"this API key has {max(left, 0)} bytes of disk quota left (NINOCAST_DISK_QUOTA_PER_KEY); "
                        "delete sessions to free space")
