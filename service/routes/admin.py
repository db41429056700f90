"""POST /admin/reload: swap to the bundle now in MODEL_DIR without stopping (hot reload).

Needs API_KEY to be set on the server and sent in X-API-Key; without a configured key the
route is off (403 admin_disabled). The same reload runs on SIGHUP (service.lifecycle).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from service.deps import RunnerDep
from service.errors import ERROR_CODES, ApiError
from service.routes.status import reload_report
from service.schemas import ErrorResponse, ReloadReport
from service.security import require_admin_key


def _error(*codes: str) -> dict[int | str, dict[str, Any]]:
    return {
        ERROR_CODES[code][0]: {
            "model": ErrorResponse,
            "description": f"`{code}`: {ERROR_CODES[code][1]}",
        }
        for code in codes
    }


router = APIRouter(tags=["operations"], dependencies=[Depends(require_admin_key)])


@router.post(
    "/admin/reload",
    response_model=ReloadReport,
    response_model_exclude_none=True,
    summary="Hot reload: load the bundle in MODEL_DIR beside the serving one, then switch",
    description="Reads, verifies (sha256) and warms up the bundle now in MODEL_DIR while "
    "the current one keeps serving, then switches to it at once; requests already queued "
    "finish on the old one. When the new bundle fails, the old one keeps serving and the "
    "answer (and /health's `last_reload`) says why. Needs API_KEY set on the server.",
    responses=_error("unauthorized", "admin_disabled", "reload_in_progress", "reload_failed"),
)
async def reload(runner: RunnerDep) -> ReloadReport:
    outcome = await asyncio.to_thread(runner.reload, "admin")
    report = reload_report(outcome)
    assert report is not None
    if not outcome.ok:
        serving = (
            f"{outcome.serving.name} {outcome.serving.version} keeps serving"
            if outcome.serving is not None
            else "no model is serving"
        )
        raise ApiError(
            "reload_failed", f"the new bundle was not loaded ({serving}): {outcome.error}"
        )
    return report
