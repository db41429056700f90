"""A short soak: 32 concurrent clients for about 15 s on full-resolution X-rays, against
`pneumoscreen serve` with its default settings. No request may fail and the server's
memory must not grow once warmed up. (The 64-client, 60 s soak with latency figures is
bench/service_bench.py; this test asserts no speed.)"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import FULLRES

CLIENTS = 32
WARM_UP_S = 5.0
SOAK_S = 15.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc")


async def load(server: LiveServer, seconds: float) -> Counter[str]:
    images = [path.read_bytes() for path in FULLRES]
    outcomes: Counter[str] = Counter()
    until = time.monotonic() + seconds

    async def client(index: int) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            turn = index
            while time.monotonic() < until:
                data = images[turn % len(images)]
                turn += 1
                try:
                    response = await http.post("/predict", files={"file": ("x.jpeg", data)})
                except httpx.HTTPError as exc:
                    outcomes[f"connection error: {type(exc).__name__}"] += 1
                    continue
                body = response.json()
                ok = response.status_code == 200 and "label" in body
                outcomes["ok" if ok else f"{response.status_code} {body}"] += 1

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return outcomes


def test_short_soak_has_no_errors_and_flat_memory(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, cli=True) as server:
        pid = server.process.pid
        warm = asyncio.run(load(server, WARM_UP_S))
        after_warm_up = rss_bytes(pid)
        soak = asyncio.run(load(server, SOAK_S))
        after_soak = rss_bytes(pid)
        assert httpx.get(server.url("/health")).status_code == 200
    failures = {k: v for k, v in (warm + soak).items() if k != "ok"}
    assert not failures, failures
    assert soak["ok"] >= CLIENTS, soak  # every client got answers
    assert after_soak <= 1.1 * after_warm_up, (
        f"RSS grew from {after_warm_up / 2**20:.0f} MB after warm-up to "
        f"{after_soak / 2**20:.0f} MB after the soak"
    )
