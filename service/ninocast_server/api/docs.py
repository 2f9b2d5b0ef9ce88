"""/docs: Swagger UI from files shipped in a Python package (fastapi-offline), never from a CDN, so the page
works on a GPU box without internet access."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("ninocast.api")
ASSETS = "/docs/assets"


def swagger_assets() -> Path | None:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css, or None without the package."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def install_docs(app: FastAPI) -> None:
    folder = swagger_assets()
    if folder is None:
        log.warning("no Swagger UI assets (pip install fastapi-offline): /docs is off; /openapi.json still works")
        return
    app.mount(ASSETS, StaticFiles(directory=folder), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon.png")
