"""The standard process metrics on /metrics of a real server, read with prometheus_client's
own parser and checked against the server process's /proc entries."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.live_server import LiveServer

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def samples(server: LiveServer) -> dict[str, float]:
    response = httpx.get(server.url("/metrics"), timeout=30)
    assert response.status_code == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.labels
    }


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_metrics_carry_the_standard_process_series(server: LiveServer) -> None:
    values = samples(server)
    for name in (
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert name in values, name
    pid = server.process.pid
    rss = vm_rss_bytes(pid)
    # the same process: its resident memory within a factor of two of /proc's
    assert rss / 2 <= values["process_resident_memory_bytes"] <= rss * 2
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    assert 3 <= values["process_open_fds"] <= open_fds + 16
    assert values["process_cpu_seconds_total"] > 0


def test_metrics_carry_the_python_runtime_series(server: LiveServer) -> None:
    response = httpx.get(server.url("/metrics"), timeout=30)
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"python_info", "python_gc_collections"} <= names
