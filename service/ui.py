"""/ui: a page for people to screen one X-ray and see the heatmap over it.

One static HTML file with its script inline: no CDN, nothing fetched but this service's
own /model and /predict (hospital networks are often offline, as for /docs).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).resolve().parent / "static" / "ui.html"


def install_ui(app: FastAPI) -> None:
    html = PAGE.read_text(encoding="utf-8")

    @app.get("/ui", include_in_schema=False)
    async def ui() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})
