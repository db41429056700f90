"""Server CPU per answered image: a soak of single-image requests against batches of 32.

    .venv/bin/python -m bench.soak_cpu [--checkout DIR] [--seconds 20] [--clients 64]

Serves the bundle with `pneumoscreen serve` from a checkout (default: this one), soaks it
with `--clients` clients sending prepared `/predict` requests (as bench.service_bench's
soak), then sends four `/predict/batch` requests of 32, and reports for each phase the
server's CPU time per answered image, read from /proc for every thread of the process:
throughput alone moves with the machine's load, CPU per image much less. With py-spy
installed (not a dependency) the threads are grouped by their Python names (event loop,
decode workers, model); onnxruntime's own pool threads have none and show as `native`.
A measurement, not a test; Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

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

    async def client(offset: int) -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        index = offset
        while time.monotonic() < stop:
            writer.write(requests[index % len(requests)])
            index += 1
            await writer.drain()
            status, headers, _ = await _read_response(reader)
            if status == 503:
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            elif status == 200:
                answered += 1
        writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--images", type=Path, help="folder of X-rays (default as service_bench)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args(argv)
    _, samples = find_images(args.images)
    server = Checkout(args.checkout.resolve(), args.model_dir.resolve())
    try:
        pid = server.process.pid
        requests = [_raw_predict(sample, "127.0.0.1") for sample in samples]
        asyncio.run(soak(server.port, requests, args.clients, 5.0))  # warm-up
        names = thread_names(pid)
        before, started = thread_cpu(pid), time.monotonic()
        answered = asyncio.run(soak(server.port, requests, args.clients, args.seconds))
        elapsed = time.monotonic() - started
        soak_cpu = per_image(before, thread_cpu(pid), names, answered)
        files = _multipart("files", [samples[i % len(samples)] for i in range(32)])
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as http:
            before, best = thread_cpu(pid), 0.0
            for _ in range(4):
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
    print(f"  batch 32 {best:6.1f} images/s (best of 4), server CPU per image {line(batch_cpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
