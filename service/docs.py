"""/docs served from the app itself (no CDN: hospital networks are often offline), and
an OpenAPI document Swagger UI 4 can render.

The vendored Swagger UI (swagger_ui_bundle, 4.15) does not render OpenAPI 3.1, which
FastAPI emits; `openapi_3_0` rewrites the few 3.1-only constructs FastAPI uses into their
3.0 equivalents (nullable, example, format: binary) and declares 3.0.3.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC_PREFIX = "/static/swagger-ui"


def openapi_3_0(node: Any) -> Any:
    """Rewrite FastAPI's OpenAPI 3.1 JSON-schema constructs into OpenAPI 3.0.3 ones."""
    if isinstance(node, list):
        return [openapi_3_0(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del node[key]
            node["nullable"] = True
            if len(rest) == 1:
                inner = rest[0]
                if "$ref" in inner:
                    node["allOf"] = [inner]
                else:
                    node.update({k: v for k, v in inner.items() if k not in node})
            elif rest:
                node[key] = rest
    if node.get("type") == "null":
        node.pop("type")
        node["nullable"] = True
    # Children after this level's null handling, so `{"type": "null"}` is still seen above.
    node = {key: openapi_3_0(value) for key, value in node.items()}
    if "contentMediaType" in node and node.get("type") == "string":
        node.pop("contentMediaType")
        node["format"] = "binary"
    if "const" in node:
        node["enum"] = [node.pop("const")]
    # JSON-schema `examples` (a list) inside schemas -> OpenAPI 3.0 `example`.
    examples = node.get("examples")
    if isinstance(examples, list) and (
        "type" in node or "$ref" in node or "allOf" in node or "title" in node
    ):
        node.pop("examples")
        if examples:
            node.setdefault("example", examples[0])
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool):
            bound = node.pop(key)
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = bound
            node[key] = True
    return node


def install_openapi(app: FastAPI) -> None:
    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                # info.summary and license.identifier are OpenAPI 3.1 only.
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
                servers=app.servers,
                license_info={"name": (app.license_info or {}).get("name", "Apache-2.0")},
            )
            schema = openapi_3_0(schema)
            schema["openapi"] = "3.0.3"
            settings = getattr(app.state, "settings", None)
            if settings is not None and settings.api_key is None:
                without_security(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]


def install_swagger_ui(app: FastAPI) -> None:
    app.mount(STATIC_PREFIX, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    oauth_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_PREFIX}/favicon-32x32.png",
            oauth2_redirect_url=oauth_redirect,
            swagger_ui_parameters={"persistAuthorization": True, "tryItOutEnabled": True},
        )

    @app.get(oauth_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


def without_security(schema: dict[str, Any]) -> None:
    """Drop the API-key scheme from an OpenAPI document, for a server without API_KEY: the
    routes are open then, and a document that asks for a key would be wrong."""
    components = schema.get("components", {})
    components.pop("securitySchemes", None)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
