"""A/B: sequential /predict latency of two checkouts of this repo, served side by side.

    .venv/bin/python -m bench.ab_latency ../before ../after --model-dir models/default

Each checkout serves the same bundle (`pneumoscreen serve`, its own code on its own port,
started from that checkout). One client then sends the same prepared POST /predict
requests (full-resolution X-rays, kept-alive connections) to both in turns, alternating
which goes first, so both see the same machine load: on a shared machine the load moves
more between minutes than two servers differ. Reported: p50 of each, B/A of the pooled
p50s, and the median, min and max of B/A over the rounds. The second server started
tends to come out a few per cent faster on this 2-core machine: compare a change both
ways (A B, then B A). A timing, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from bench.service_bench import Sample, _blocking_response, _raw_predict, find_images
from tests.support.live_server import free_port


class Checkout:
    """`pneumoscreen serve` of one checkout, and one kept-alive connection to it."""

    def __init__(self, tree: Path, model_dir: Path, timeout: float = 180.0) -> None:
        self.tree = tree
        self.port = free_port()
        env = dict(os.environ, MODEL_DIR=str(model_dir), PYTHONPATH=str(tree))
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--log-level", "warning"),
            ],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server of {tree} exited with {self.process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server of {tree} was not ready in {timeout:g} s")
            time.sleep(0.1)
        self.connection = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        self.stream: IO[bytes] = self.connection.makefile("rb")

    def post(self, request: bytes) -> tuple[float, int]:
        started = time.perf_counter()
        self.connection.sendall(request)
        status, _ = _blocking_response(self.stream)
        return (time.perf_counter() - started) * 1000, status

    def close(self) -> None:
        self.stream.close()
        self.connection.close()
        self.process.terminate()
        self.process.wait(30)


def compare(a: Checkout, b: Checkout, samples: list[Sample], rounds: int, per_round: int) -> str:
    requests = [_raw_predict(sample, "127.0.0.1") for sample in samples]
    for checkout in (a, b):  # warm both up
        for request in requests[:15]:
            checkout.post(request)
    ratios: list[float] = []
    pooled: dict[str, list[float]] = {"A": [], "B": []}
    for number in range(rounds):
        times: dict[str, list[float]] = {"A": [], "B": []}
        for index in range(per_round):
            request = requests[(number * per_round + index) % len(requests)]
            order = (("A", a), ("B", b)) if (index + number) % 2 == 0 else (("B", b), ("A", a))
            for name, checkout in order:
                elapsed, status = checkout.post(request)
                if status == 200:  # the gate's refusals are answered earlier: not timed
                    times[name].append(elapsed)
        ratios.append(statistics.median(times["B"]) / statistics.median(times["A"]))
        for name in pooled:
            pooled[name] += times[name]
    p50 = {name: statistics.median(values) for name, values in pooled.items()}
    return (
        f"A {a.tree}: p50 {p50['A']:.2f} ms\n"
        f"B {b.tree}: p50 {p50['B']:.2f} ms\n"
        f"B/A of the pooled p50s {p50['B'] / p50['A']:.3f}; per round (of {rounds}) median "
        f"{statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="checkout A (the baseline)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--images", type=Path, help="folder of X-rays (default as service_bench)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=60, help="requests to each per round")
    args = parser.parse_args(argv)
    _, samples = find_images(args.images)
    a = Checkout(args.a.resolve(), args.model_dir.resolve())
    try:
        b = Checkout(args.b.resolve(), args.model_dir.resolve())
        try:
            print(compare(a, b, samples, args.rounds, args.per_round))
        finally:
            b.close()
    finally:
        a.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
