"""Optional API key for the predict routes (header X-API-Key, constant-time comparison)."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from service import deps
from service.errors import ApiError

API_KEY_HEADER = "X-API-Key"

# auto_error=False: the key is optional server-side; the scheme still appears in OpenAPI,
# so "Authorize" in /docs sends it.
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="ApiKey",
    description="Needed by /predict and /predict/batch only when the server sets API_KEY.",
    auto_error=False,
)


def key_matches(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _require_match(given: str | None, expected: str) -> None:
    """401 unauthorized unless `given` is the key (compared in constant time)."""
    if not key_matches(given, expected):
        raise ApiError(
            "unauthorized",
            f"a valid API key is required in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )


async def require_api_key(request: Request, given: str | None = Security(api_key_scheme)) -> None:
    secret = deps.settings(request).api_key
    if secret is not None:
        _require_match(given, secret.get_secret_value())


async def require_admin_key(request: Request, given: str | None = Security(api_key_scheme)) -> None:
    """Admin routes: always need the key, and are off (403 admin_disabled) without one."""
    secret = deps.settings(request).api_key
    if secret is None:
        raise ApiError(
            "admin_disabled",
            "admin routes are disabled: set API_KEY on the server to use them",
        )
    _require_match(given, secret.get_secret_value())
