"""The API docs, served whole by the service (nothing from a CDN, so they work offline):

* `GET /docs`: Swagger UI, its script, stylesheet and icon from the `swagger-ui-bundle` package
  (Swagger UI 4.15.5, Apache-2.0); the validator badge (an image from validator.swagger.io) is off;
* `GET /redoc`: ReDoc, its standalone bundle pinned in app/api/static/redoc.standalone.js (ReDoc 2.5.4
  from npm, MIT: app/api/static/redoc.LICENSE and redoc.standalone.js.LICENSE.txt), without Google Fonts;
* `GET /docs/assets/{name}`: only the files in ASSETS.

Whether they need an API key when keys are on: `CAPTIONER_DOCS_PUBLIC` (app/api/auth.py). Left out of the
OpenAPI schema, like FastAPI's own docs routes (which `create_app` turns off).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from app.api.errors import APIError

router = APIRouter()

ASSETS_PREFIX = "/docs/assets/"
STATIC = Path(__file__).resolve().parent.parent / "static"
# name -> (file, content type); nothing else is served from here
ASSETS: dict[str, tuple[Path, str]] = {
    "swagger-ui-bundle.js": (Path(str(swagger_ui_path)) / "swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": (Path(str(swagger_ui_path)) / "swagger-ui.css", "text/css; charset=utf-8"),
    "favicon-32x32.png": (Path(str(swagger_ui_path)) / "favicon-32x32.png", "image/png"),
    "redoc.standalone.js": (STATIC / "redoc.standalone.js", "text/javascript; charset=utf-8"),
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
        swagger_js_url=ASSETS_PREFIX + "swagger-ui-bundle.js", swagger_css_url=ASSETS_PREFIX + "swagger-ui.css",
        swagger_favicon_url=ASSETS_PREFIX + "favicon-32x32.png", oauth2_redirect_url=OAUTH2_REDIRECT,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )


@router.get(OAUTH2_REDIRECT, include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - ReDoc",
                          redoc_js_url=ASSETS_PREFIX + "redoc.standalone.js",
                          redoc_favicon_url=ASSETS_PREFIX + "favicon-32x32.png", with_google_fonts=False)


@router.get(ASSETS_PREFIX + "{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    found = ASSETS.get(name)
    if found is None:
        raise APIError(404, "not_found", "no such file")
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
