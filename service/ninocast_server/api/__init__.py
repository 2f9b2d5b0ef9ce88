"""The HTTP server: FastAPI routes over the session store and the compute queue."""

from .app import create_app

__all__ = ["create_app"]
