"""Pages a person opens in a browser, served by the app itself and working offline.

- ``GET /playground``: one self-contained HTML page (``playground.html``, inline CSS and JS, no
  external asset) with a form for every field of the app's generating endpoints, built from the
  app's own ``/openapi.json`` when it loads (so its defaults and bounds follow fal.toml). It posts
  to ``/stream`` (live previews), ``/image-to-image`` or ``/inpaint`` and cancels through fal's
  ``<endpoint>/cancel`` with the ``x-fal-request-id`` it generated. All its URLs are relative, so it
  works under a root path too.
- ``/docs`` and ``/redoc``: FastAPI's pages, but with Swagger UI's and ReDoc's JS and CSS served by
  the app from the ``fastapi-offline`` package (``/docs/assets/...``) instead of a CDN. Without that
  package installed, FastAPI's own (CDN) pages stay.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse

log = logging.getLogger(__name__)

PLAYGROUND_PATH = "/playground"
PAGE = Path(__file__).with_name("playground.html")
# Where the docs pages' JS, CSS and favicon are served from (a Starlette mount).
DOCS_ASSETS_PATH = "/docs/assets"
# The files fastapi-offline ships in its package's static/ folder.
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"
REDOC_IMAGES_ONLY_LOCAL = "img-src 'self' data: blob:"


def add_playground(app: Any) -> None:
    """Serve ``playground.html`` on GET /playground (not part of the OpenAPI schema)."""
    page = PAGE.read_text(encoding="utf-8")

    async def playground(request: Request) -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.add_route(PLAYGROUND_PATH, playground, methods=["GET"], include_in_schema=False)


def docs_assets() -> Path | None:
    """The folder of fastapi-offline's copies of Swagger UI's and ReDoc's files, or None when the
    package is not installed."""
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if all((folder / name).is_file() for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON)) else None


def serve_docs_offline(app: Any) -> bool:
    """Replace FastAPI's /docs and /redoc (whose pages load their JS and CSS from a CDN) by the same
    pages with those files served by the app. FastAPI's OAuth2 redirect page and /openapi.json stay
    as they are; the page URLs take the request's root path, as FastAPI's own do. False (and
    FastAPI's pages kept) when fastapi-offline is missing or the app has no OpenAPI."""
    from starlette.staticfiles import StaticFiles

    folder = docs_assets()
    if folder is None or not app.openapi_url:
        log.warning("/docs and /redoc load their assets from a CDN: the fastapi-offline package is not installed")
        return False
    replaced = {url for url in (app.docs_url, app.redoc_url) if url}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in replaced]
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=folder), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root + app.openapi_url, root + DOCS_ASSETS_PATH

    if app.docs_url:
        async def swagger_ui_html(request: Request) -> HTMLResponse:
            openapi_url, assets = urls(request)
            redirect = app.swagger_ui_oauth2_redirect_url
            return get_swagger_ui_html(
                openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{assets}/{SWAGGER_JS}", swagger_css_url=f"{assets}/{SWAGGER_CSS}",
                swagger_favicon_url=f"{assets}/{FAVICON}",
                oauth2_redirect_url=request.scope.get("root_path", "").rstrip("/") + redirect if redirect else None,
                init_oauth=app.swagger_ui_init_oauth,
                # No validator badge: it would send the schema's URL to swagger.io.
                swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
            )

        app.add_route(app.docs_url, swagger_ui_html, include_in_schema=False)
    if app.redoc_url:
        async def redoc_html(request: Request) -> HTMLResponse:
            openapi_url, assets = urls(request)
            page = get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                                  redoc_js_url=f"{assets}/{REDOC_JS}", redoc_favicon_url=f"{assets}/{FAVICON}",
                                  with_google_fonts=False)
            # ReDoc's sidebar shows Redocly's logo from their CDN (and hides it when it fails to load):
            # images from elsewhere are not fetched at all.
            page.headers["Content-Security-Policy"] = REDOC_IMAGES_ONLY_LOCAL
            return page

        app.add_route(app.redoc_url, redoc_html, include_in_schema=False)
    return True
