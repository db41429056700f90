"""Server CPU per answered image: a soak of single-image requests against batches of 32.

    .venv/bin/python -m bench.soak_cpu [--checkout DIR] [--seconds 20] [--clients 64]

Serves the bundle with `pneumoscreen serve` from a checkout (default: this one), soaks it
with `--clients` clients sending prepared `/predict` requests (as bench.service_bench's
soak), then sends four `/predict/batch` requests of 32, and reports for each phase the
server's CPU time per answered image, read from /proc for every thread of the process:
throughput alone moves with the machine's load, CPU per image much less. For the soak it
also reports the clients' own CPU per image (they share the machine's cores with the
server) and how much of the time the cores were idle; with `--states`, which server
threads were runnable whenever fewer were than there are cores. With py-spy
installed (not a dependency) the threads are grouped by their Python names (event loop,
decode workers, model); onnxruntime's own pool threads have none and show as `native`.
A measurement, not a test; Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from bench.ab_latency import Checkout
from bench.service_bench import _multipart, _raw_predict, _read_response, find_images

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid`, by thread id."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[tid] = (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def thread_names(pid: int) -> dict[str, str]:
    """Python thread names by thread id, from `py-spy dump` when it is installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run(
        [spy, "dump", "--pid", str(pid), "--nonblocking"],
        check=False,  # no names is no error: the threads are summed instead
        capture_output=True,
        text=True,
    ).stdout
    return {
        tid: re.sub(r"_\d+$", "", name)
        for tid, name in re.findall(r'Thread (\d+) \(\w+\): "([^"]+)"', dump)
    }


def machine_cpu() -> tuple[float, float]:
    """Seconds all cores spent busy and idle since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / TICK, idle / TICK


def own_cpu() -> float:
    """CPU seconds of this process (the clients), user + system."""
    times = os.times()
    return times.user + times.system


class StateSampler:
    """Which of the server's threads are runnable (state R: running or waiting for a
    core), every `interval` seconds, on a thread of this process. What it reports is the
    share of samples with fewer runnable threads than the machine has cores (a core
    idle), and which thread groups ran then."""

    def __init__(self, pid: int, names: Mapping[str, str], interval: float = 0.005) -> None:
        self.files = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                self.files[tid] = os.open(f"/proc/{pid}/task/{tid}/stat", os.O_RDONLY)
            except OSError:
                continue
        self.names = names
        self.interval = interval
        self.samples = 0
        self.cpu_seconds = 0.0  # the sampler's own, which this process's CPU includes
        self.short: collections.Counter[tuple[str, ...]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for fd in self.files.values():
            os.close(fd)

    def _run(self) -> None:
        cores = os.cpu_count() or 1
        while not self._stop.wait(self.interval):
            running = []
            for tid, fd in self.files.items():
                try:
                    stat = os.pread(fd, 512, 0).decode()
                except OSError:
                    continue
                if stat[stat.rindex(")") + 2] == "R":
                    running.append(self.names.get(tid, "native"))
            self.samples += 1
            if len(running) < cores:
                self.short[tuple(sorted(running))] += 1
        self.cpu_seconds = time.thread_time()

    def report(self) -> list[str]:
        if not self.samples:
            return []
        idle = sum(self.short.values())
        share = 100 * idle / self.samples
        lines = [f"  fewer runnable server threads than cores in {share:.1f} % of samples; then:"]
        for group, count in self.short.most_common(6):
            lines.append(f"    {100 * count / self.samples:5.1f} %  {', '.join(group) or 'none'}")
        return lines


def per_image(
    before: Mapping[str, float], after: Mapping[str, float], names: Mapping[str, str], images: int
) -> dict[str, float]:
    """ms of CPU per image, by thread group, and in total."""
    groups: dict[str, float] = {}
    for tid, seconds in after.items():
        group = names.get(tid, "native" if names else "all threads")
        groups[group] = groups.get(group, 0.0) + seconds - before.get(tid, 0.0)
    out = {group: 1000 * value / images for group, value in groups.items() if value > 0}
    out["total"] = 1000 * sum(groups.values()) / images
    return out


async def soak(port: int, requests: list[bytes], clients: int, seconds: float) -> int:
    """Answered requests; a client refused with 503 waits its Retry-After."""
    stop = time.monotonic() + seconds
    answered = 0
    turns = itertools.count()  # one round-robin over the images for all clients (as batches)

    async def client() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            writer.write(requests[next(turns) % len(requests)])
            await writer.drain()
            status, headers, _ = await _read_response(reader)
            if status == 503:
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            elif status == 200:
                answered += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--images", type=Path, help="folder of X-rays (default as service_bench)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--states",
        action="store_true",
        help="also sample which server threads are runnable during the soak (every 5 ms)",
    )
    args = parser.parse_args(argv)
    _, samples = find_images(args.images)
    server = Checkout(args.checkout.resolve(), args.model_dir.resolve())
    try:
        pid = server.process.pid
        requests = [_raw_predict(sample, "127.0.0.1") for sample in samples]
        asyncio.run(soak(server.port, requests, args.clients, 5.0))  # warm-up
        names = thread_names(pid)
        before, started = thread_cpu(pid), time.monotonic()
        client_before, (busy_before, idle_before) = own_cpu(), machine_cpu()
        with StateSampler(pid, names) if args.states else contextlib.nullcontext() as sampler:
            answered = asyncio.run(soak(server.port, requests, args.clients, args.seconds))
        elapsed = time.monotonic() - started
        sampler_cpu = sampler.cpu_seconds if sampler is not None else 0.0
        client_ms = 1000 * (own_cpu() - client_before - sampler_cpu) / max(answered, 1)
        busy, idle = (a - b for a, b in zip(machine_cpu(), (busy_before, idle_before), strict=True))
        idle_share = idle / (busy + idle) if busy + idle else 0.0
        soak_cpu = per_image(before, thread_cpu(pid), names, answered)
        # Four batches of 32 going on round the images: the soak's mix, not the first 32.
        batches = [
            _multipart("files", [samples[i % len(samples)] for i in range(start, start + 32)])
            for start in range(0, 128, 32)
        ]
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as http:
            before, best = thread_cpu(pid), 0.0
            for files in batches:
                begun = time.perf_counter()
                http.post("/predict/batch", files=files).raise_for_status()
                best = max(best, 32 / (time.perf_counter() - begun))
            batch_cpu = per_image(before, thread_cpu(pid), names, 4 * 32)
    finally:
        server.close()

    def line(cpu: dict[str, float]) -> str:
        parts = [f"{group} {value:.1f}" for group, value in cpu.items() if group != "total"]
        return f"{cpu['total']:.1f} ms ({', '.join(parts)})"

    print(f"checkout {args.checkout}: {args.clients} clients for {args.seconds:g} s")
    print(f"  soak     {answered / elapsed:6.1f} images/s, server CPU per image {line(soak_cpu)}")
    print(
        f"           the clients (this process) {client_ms:.1f} ms of CPU per image; the "
        f"machine's cores idle {100 * idle_share:.0f} % of the soak"
    )
    if sampler is not None:
        print("\n".join(sampler.report()))
    print(f"  batch 32 {best:6.1f} images/s (best of 4), server CPU per image {line(batch_cpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
