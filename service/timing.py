"""Server-Timing (W3C): where a predict request's time went, in its answer's headers.

    Server-Timing: decode;dur=7.9, queue;dur=0.0, model;dur=10.8, app;dur=20.3

`decode` is the decoding and preprocessing of the request's images (summed over them: a
batch's images decode side by side, so its sum can exceed `app`),
`queue` the longest any of its images waited for the model, `model` the model runs they
were part of (shared with the other requests in those runs), and `app` the time from the
request reaching the app to its answer starting. What `app` leaves over the others is the
HTTP app's own cost (routing, the multipart form, the gate's comparison, the JSON); what a
client measures over `app` is the network and HTTP parsing. Browsers' developer tools
show the header; bench/service_bench.py reads it. Durations only: no names, sizes or
anything from the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEADER = b"server-timing"


@dataclass
class StageTimes:
    """Milliseconds per stage of one request (filled in as it goes)."""

    decode_ms: float = 0.0
    queue_ms: float = 0.0
    model_ms: float = 0.0

    def header(self, app_ms: float) -> bytes:
        stages = (
            ("decode", self.decode_ms),
            ("queue", self.queue_ms),
            ("model", self.model_ms),
            ("app", app_ms),
        )
        return ", ".join(f"{name};dur={value:.2f}" for name, value in stages).encode("latin-1")


_KEY = "stage_times"


def stage_times(state: Any) -> StageTimes:
    """The request's StageTimes (`request.state`), created on first use."""
    times: StageTimes | None = getattr(state, _KEY, None)
    if times is None:
        times = StageTimes()
        setattr(state, _KEY, times)
    return times


def recorded(scope_state: dict[str, Any]) -> StageTimes | None:
    """The StageTimes a request recorded, from the ASGI scope's state (middleware)."""
    times = scope_state.get(_KEY)
    return times if isinstance(times, StageTimes) else None
