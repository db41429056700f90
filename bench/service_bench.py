"""Latency and throughput of the real service on full-resolution chest X-rays.

    python -m bench.service_bench --model-dir models/default     # (make bench)
    python -m bench.service_bench --tiny                          # no trained bundle needed

Starts the service with `pneumoscreen serve` on a free loopback port (tests/support/live_server.py),
so with its HTTP budgets, admission control and batching scheduler, then,
over real HTTP with the full-resolution JPEGs of ../shared/data/chest_xray_fullres
(falling back to tests/fixtures/fullres):

- /predict latency p50/p95/p99, sequential, after a warm-up;
- /predict/batch throughput (images/s) at batch sizes 1, 8 and 32;
- /predict throughput with several client threads;
- a soak: 64 clients for 60 s sending single images (a client that is refused with 503
  server_busy waits Retry-After and tries again): answered latency p50/p95/p99, served
  throughput against the best single-client batch throughput of the same run (the
  batches run before and after the soak, and each size's two windows are pooled: the
  best of six windows of a second or two would pick the luckiest), refusals, errors and
  connection errors, and the server's RSS after warm-up and after the soak;

and in-process, the same pipeline the service runs: decode+preprocess ms per image with
and without JPEG draft mode, and onnxruntime inference ms at batch 1 (and 32).

Every loop is bounded; only 127.0.0.1 is contacted. This is a benchmark, not a test: it
asserts nothing about speed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
SHARED_FULLRES = REPO_ROOT.parent / "shared" / "data" / "chest_xray_fullres"
FIXTURE_FULLRES = TESTS_DIR / "fixtures" / "fullres"
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from service.bundle import INPUT_NAME, MODEL_FILE, BundleError, read_bundle
from service.config import Settings
from service.onnx_session import SessionThreads, make_session
from service.preprocessing import decode_grey, load_model_input, to_model_input
from training.data import IMAGE_SUFFIXES


@dataclass
class Sample:
    name: str
    data: bytes


def find_images(explicit: Path | None) -> tuple[Path, list[Sample]]:
    """The full-resolution X-rays of `explicit`, else ../shared/data, else the fixtures."""
    for folder in [explicit] if explicit else [SHARED_FULLRES, FIXTURE_FULLRES]:
        if folder is None or not folder.is_dir():
            continue
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            return folder, [Sample(p.name, p.read_bytes()) for p in paths]
    raise SystemExit(f"no images found in {explicit or SHARED_FULLRES} or {FIXTURE_FULLRES}")


def scored_samples(base_url: str, samples: list[Sample]) -> tuple[list[Sample], dict[str, int]]:
    """The samples the service scores (200), and how many it refused, by code: the input
    gate may refuse a few real X-rays (docs/gate.md), and a refusal is a cheaper answer
    than a score, so the timed sections use only what is scored."""
    import httpx

    kept, refused = [], Counter()
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for sample in samples:
            response = http.post("/predict", files=_multipart("file", [sample]))
            if response.status_code == 200:
                kept.append(sample)
            elif response.status_code == 422:
                refused[response.json()["error"]["code"]] += 1
            else:
                _check(response)
    if not kept:
        raise SystemExit("the service scored none of the images")
    return kept, dict(refused)


def percentiles(values_ms: list[float]) -> dict[str, float]:
    array = np.asarray(values_ms, dtype=np.float64)
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _multipart(field: str, samples: list[Sample]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (s.name, s.data, "application/octet-stream")) for s in samples]


def _check(response: Any) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:300]}")
    return response.json()


# --- over HTTP ------------------------------------------------------------------------


def bench_latency(base_url: str, samples: list[Sample], warmup: int, requests: int) -> dict:
    import httpx

    timings, server_ms = [], []
    with httpx.Client(base_url=base_url, timeout=120) as http:
        images = cycle(samples)
        for sample in islice(images, warmup):
            _check(http.post("/predict", files=_multipart("file", [sample])))
        for sample in islice(images, requests):
            started = time.perf_counter()
            body = _check(http.post("/predict", files=_multipart("file", [sample])))
            timings.append((time.perf_counter() - started) * 1000)
            server_ms.append(float(body.get("inference_ms", float("nan"))))
    result = percentiles(timings)
    result["server_inference_ms_mean"] = float(np.nanmean(server_ms))
    return result


def bench_batches(
    base_url: str, samples: list[Sample], batch_sizes: list[int], images_per_size: int, warmup: int
) -> dict[int, dict]:
    """Images/s per batch size. The sizes take turns (rounds of `max(batch_sizes)` images
    each), so a burst of load from something else on the machine hits them all alike."""
    import httpx

    per_round = max(batch_sizes)
    rounds = max(1, images_per_size // per_round)
    timings: dict[int, list[float]] = {size: [] for size in batch_sizes}
    images = cycle(samples)
    with httpx.Client(base_url=base_url, timeout=300) as http:
        for _ in range(warmup):
            _check(http.post("/predict/batch", files=_multipart("files", samples[:1])))
        for _ in range(rounds):
            for size in batch_sizes:
                for _ in range(max(1, per_round // size)):
                    batch = list(islice(images, size))
                    started = time.perf_counter()
                    body = _check(http.post("/predict/batch", files=_multipart("files", batch)))
                    timings[size].append(time.perf_counter() - started)
                    errors = [r for r in body["results"] if r.get("error")]
                    if errors:
                        raise RuntimeError(f"batch of {size}: {errors[:3]}")
    results: dict[int, dict] = {}
    for size, times in timings.items():
        total = sum(times)
        results[size] = {
            "requests": len(times),
            "images": len(times) * size,
            "seconds": total,
            "images_per_s": len(times) * size / total,
            "ms_per_request_p50": float(np.percentile(times, 50) * 1000),
        }
    return results


def bench_concurrent(base_url: str, samples: list[Sample], threads: int, requests: int) -> dict:
    import httpx

    per_thread = max(1, requests // threads)

    def worker(offset: int) -> list[float]:
        timings = []
        with httpx.Client(base_url=base_url, timeout=300) as http:
            for sample in islice(cycle(samples[offset:] + samples[:offset]), per_thread):
                started = time.perf_counter()
                _check(http.post("/predict", files=_multipart("file", [sample])))
                timings.append((time.perf_counter() - started) * 1000)
        return timings

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        offsets = [i * len(samples) // threads for i in range(threads)]
        timings = [t for chunk in pool.map(worker, offsets) for t in chunk]
    seconds = time.perf_counter() - started
    result = percentiles(timings)
    result.update({"threads": threads, "seconds": seconds, "images_per_s": len(timings) / seconds})
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _raw_predict(sample: Sample, host: str) -> bytes:
    """One whole POST /predict request (keep-alive), built once: the soak's clients send
    prepared bytes, so the client side costs little CPU next to the server's."""
    from tests.support.live_server import raw_multipart_request

    return raw_multipart_request("/predict", _multipart("file", [sample]), host)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _soak(base_url: str, samples: list[Sample], clients: int, seconds: float) -> dict:
    host_port = base_url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    requests = [_raw_predict(sample, host_port) for sample in samples]
    answered: list[float] = []
    refused: list[float] = []
    errors: dict[str, int] = {}
    connection_errors = 0
    until = time.monotonic() + seconds
    # One round-robin over the images for all clients together, as the batches go through
    # them: each client walking the list from its own start would hand the soak a mix of
    # images of its own (the first in the list, more often), not the batches' mix.
    turns = itertools.count()

    async def client() -> None:
        nonlocal connection_errors
        reader = writer = None
        while time.monotonic() < until:
            request = requests[next(turns) % len(requests)]
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                assert reader is not None
                writer.write(request)
                await writer.drain()
                status, headers, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                connection_errors += 1
                key = f"connection: {type(exc).__name__}"
                errors[key] = errors.get(key, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
            code = json.loads(body).get("error", {}).get("code") if status != 200 else None
            if status == 200:
                answered.append(elapsed)
            elif status == 503 and code == "server_busy":
                refused.append(elapsed)
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            else:
                key = f"{status} {code}"
                errors[key] = errors.get(key, 0) + 1
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    result: dict[str, Any] = {
        "clients": clients,
        "seconds": wall,
        "answered": len(answered),
        "served_images_per_s": len(answered) / wall,
        "refused_503": len(refused),
        "refused_ms_p99": float(np.percentile(refused, 99)) if refused else None,
        "errors": errors,
        "connection_errors": connection_errors,
    }
    if answered:
        result["answered_ms"] = percentiles(answered)
    return result


def _model_runs(base_url: str) -> tuple[float, float, float]:
    """(model runs, images run) so far, from the server's batch-size histogram, and how
    many runs may go side by side (its model workers)."""
    import httpx

    values = {}
    names = (
        "pneumoscreen_batch_size_count",
        "pneumoscreen_batch_size_sum",
        "pneumoscreen_model_workers",
    )
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        for name in names:
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    return (
        values.get("pneumoscreen_batch_size_count", 0.0),
        values.get("pneumoscreen_batch_size_sum", 0.0),
        values.get("pneumoscreen_model_workers", 1.0),
    )


IDLE_S = 5.0


def bench_soak(
    server: Any, samples: list[Sample], clients: int, seconds: float, warmup: float
) -> dict:
    """`clients` concurrent clients for `seconds` after `warmup` seconds of the same load."""
    pid = server.process.pid
    rss_start = rss_mb(pid)
    warm = asyncio.run(_soak(server.base_url, samples, clients, warmup))
    rss_warm = rss_mb(pid)
    runs_before, images_before, _ = _model_runs(server.base_url)
    result = asyncio.run(_soak(server.base_url, samples, clients, seconds))
    runs_after, images_after, workers = _model_runs(server.base_url)
    result.update(
        {
            "model_workers": workers,
            "model_runs": runs_after - runs_before,
            "images_per_model_run": (images_after - images_before)
            / max(1.0, runs_after - runs_before),
            "warmup_seconds": warmup,
            "warmup_errors": warm["errors"],
            "rss_mb_start": rss_start,
            "rss_mb_after_warmup": rss_warm,
            "rss_mb_after_soak": rss_mb(pid),
        }
    )
    time.sleep(IDLE_S)  # the scheduler gives the model's batch memory back when idle
    result["rss_mb_idle"] = rss_mb(pid)
    return result


# --- in process -----------------------------------------------------------------------


def _time_per_item(function: Callable[[Sample], object], samples: list[Sample]) -> list[float]:
    timings = []
    for sample in samples:
        started = time.perf_counter()
        function(sample)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def service_session(model_dir: Path, lone: bool = False) -> Any:
    """An onnxruntime session built as the runner builds it (service.onnx_session), with
    the settings' defaults (not this shell's environment) on the CPU: with `lone`, the one
    a lone image runs on (LONE_REQUEST_SPINNING), so that the in-process reference of a
    single image is what the service itself runs; else one run on all the model's threads
    (the service's batches under load share them between MODEL_WORKERS runs)."""
    settings = Settings.model_construct()
    threads = (
        SessionThreads.lone_of(settings)
        if lone and settings.lone_request_spinning
        else SessionThreads.of(settings)
    )
    return make_session(model_dir / MODEL_FILE, threads)


def _blocking_response(stream: Any) -> tuple[int, dict[str, float]]:
    """Read one HTTP/1.1 response (with Content-Length) off a socket file: its status
    and its Server-Timing stages in ms (service/timing.py)."""
    status = int(stream.readline().split(b" ", 2)[1])
    length, stages = 0, {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"server-timing":
            for entry in value.decode("latin-1").split(","):
                stage, _, duration = entry.strip().partition(";dur=")
                stages[stage] = float(duration)
    stream.read(length)
    return status, stages


def bench_single_interleaved(
    base_url: str, model_dir: Path, samples: list[Sample], rounds: int
) -> dict:
    """One image three ways, in turns, so all see the same machine: POST /predict as
    prepared request bytes on a kept-alive connection (what the service itself costs:
    a gateway forwarding a file it holds), the same through httpx (which builds the
    multipart body and parses the answer per request: the client's cost, about 3 ms
    here), and the image decoded and run at batch 1 in this process (the server idle)."""
    import httpx

    meta = read_bundle(model_dir)
    session = service_session(model_dir, lone=True)
    host = base_url.removeprefix("http://")
    name, port = host.rsplit(":", 1)
    prepared = [_raw_predict(sample, host) for sample in samples]
    raw_ms, http_ms, local_ms, local_decode_ms = [], [], [], []
    stages: dict[str, list[float]] = {}
    with (
        httpx.Client(base_url=base_url, timeout=120) as http,
        socket.create_connection((name, int(port)), timeout=120) as connection,
        connection.makefile("rb") as stream,
    ):
        for index in range(rounds + 5):
            sample = samples[index % len(samples)]
            started = time.perf_counter()
            connection.sendall(prepared[index % len(samples)])
            status, timing = _blocking_response(stream)
            elapsed_raw = (time.perf_counter() - started) * 1000
            if status != 200:
                raise RuntimeError(f"POST /predict answered {status}")
            started = time.perf_counter()
            _check(http.post("/predict", files=_multipart("file", [sample])))
            elapsed_http = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            image = load_model_input(sample.data, meta.input.height, meta.input.width)
            decoded = time.perf_counter()
            session.run(None, {INPUT_NAME: image[None]})
            elapsed_local = (time.perf_counter() - started) * 1000
            local_decode_ms.append((decoded - started) * 1000)
            if index >= 5:  # the first few warm all up
                timing["outside the app"] = elapsed_raw - timing.get("app", elapsed_raw)
                timing["app, besides decode and model"] = timing.get("app", 0.0) - (
                    timing.get("decode", 0.0) + timing.get("queue", 0.0) + timing.get("model", 0.0)
                )
                for stage, value in timing.items():
                    stages.setdefault(stage, []).append(value)
                raw_ms.append(elapsed_raw)
                http_ms.append(elapsed_http)
                local_ms.append(elapsed_local)
    return {
        "prepared_ms": percentiles(raw_ms),
        "http_ms": percentiles(http_ms),
        "decode_and_model_ms": percentiles(local_ms),
        "in_process_decode_ms": percentiles(local_decode_ms[5:]),
        # Medians of the prepared requests' Server-Timing stages, and what is left over.
        "server_timing_ms": {stage: statistics.median(v) for stage, v in stages.items()},
    }


def bench_in_process(model_dir: Path, samples: list[Sample], inference_runs: int) -> dict:
    meta = read_bundle(model_dir)
    height, width = meta.input.height, meta.input.width

    def no_draft(sample: Sample) -> np.ndarray:
        return to_model_input(decode_grey(sample.data), height, width)

    def draft(sample: Sample) -> np.ndarray:
        return load_model_input(sample.data, height, width)  # what the service runs

    for sample in samples[:3]:  # warm the decoders' caches and allocator
        no_draft(sample), draft(sample)
    no_draft_ms, draft_ms = [], []
    for sample in samples:  # interleaved, so both see the same machine load
        no_draft_ms += _time_per_item(no_draft, [sample])
        draft_ms += _time_per_item(draft, [sample])
    pixels = [int(np.prod(decode_grey(s.data).shape)) for s in samples]

    lone, session = service_session(model_dir, lone=True), service_session(model_dir)
    inputs = [draft(s) for s in samples[:32]]
    while len(inputs) < 32:
        inputs += inputs[: 32 - len(inputs)]
    one = inputs[0][None]
    many = np.stack(inputs)
    for _ in range(5):
        lone.run(None, {INPUT_NAME: one})
    batch1 = []
    for index in range(inference_runs):  # a lone image: on the session the service uses
        started = time.perf_counter()
        lone.run(None, {INPUT_NAME: inputs[index % len(inputs)][None]})
        batch1.append((time.perf_counter() - started) * 1000)
    del lone
    session.run(None, {INPUT_NAME: many})
    batch32 = []
    for _ in range(max(3, inference_runs // 10)):
        started = time.perf_counter()
        session.run(None, {INPUT_NAME: many})
        batch32.append((time.perf_counter() - started) * 1000)
    return {
        "input": f"{height}x{width}",
        "megapixels_mean": float(np.mean(pixels) / 1e6),
        "decode_preprocess_ms_no_draft": percentiles(no_draft_ms),
        "decode_preprocess_ms_draft": percentiles(draft_ms),
        "inference_ms_batch1": percentiles(batch1),
        "inference_ms_batch32": percentiles(batch32),
        "inference_ms_per_image_batch32": statistics.median(batch32) / 32,
    }


# --- report ---------------------------------------------------------------------------


def report(results: dict) -> str:
    lines = []
    meta = results["setup"]
    lines.append(f"pneumoscreen service benchmark  ({meta['when']})")
    lines.append(
        f"  bundle   : {meta['bundle']}  ({meta['model']}, input {meta['input']})"
        + ("  [TINY TEST GRAPH, not the real model]" if meta["tiny"] else "")
    )
    megapixels = results.get("in_process", {}).get("megapixels_mean")
    lines.append(
        f"  images   : {meta['n_images']} from {meta['images']}"
        + (f" (mean {megapixels:.2f} MP)" if megapixels else "")
    )
    lines.append(f"  machine  : {meta['machine']}")
    lines.append(
        f"  load avg : {meta['load_before']} before, {meta['load_after']} after "
        "(1-min; > CPUs means other work competed for the cores)"
    )
    lines.append("")
    lat = results.get("latency")
    if lat:
        lines.append(f"POST /predict, sequential ({lat['n']} requests after warm-up)")
        lines.append(
            f"  latency ms     p50 {lat['p50']:8.1f}   p95 {lat['p95']:8.1f}   "
            f"p99 {lat['p99']:8.1f}   mean {lat['mean']:8.1f}"
        )
        lines.append(f"  server-reported inference_ms mean {lat['server_inference_ms_mean']:.2f}")
        lines.append("")
    if "batch" in results:
        lines.append("POST /predict/batch throughput")
        lines.append("  batch  requests  images   images/s   ms/request p50")
        for size, row in results["batch"].items():
            lines.append(
                f"  {size:>5}  {row['requests']:>8}  {row['images']:>6}  "
                f"{row['images_per_s']:>9.1f}  {row['ms_per_request_p50']:>15.1f}"
            )
        after = results.get("batch_after_soak")
        if after:
            lines.append("  again after the soak:")
            for size, row in after.items():
                lines.append(
                    f"  {size:>5}  {row['requests']:>8}  {row['images']:>6}  "
                    f"{row['images_per_s']:>9.1f}  {row['ms_per_request_p50']:>15.1f}"
                )
            lines.append("  before and after together (images / seconds):")
            for size, images_per_s in pooled_batch_throughput(results).items():
                lines.append(f"  {size:>5}  {'':>8}  {'':>6}  {images_per_s:>9.1f}")
        lines.append("")
    conc = results.get("concurrent")
    if conc:
        lines.append(f"POST /predict, {conc['threads']} client threads ({conc['n']} requests)")
        lines.append(
            f"  {conc['images_per_s']:.1f} images/s   latency ms p50 "
            f"{conc['p50']:.1f}  p95 {conc['p95']:.1f}  p99 {conc['p99']:.1f}"
        )
        lines.append("")
    soak = results.get("soak")
    if soak:
        lines.append(
            f"Soak: POST /predict, {soak['clients']} clients for {soak['seconds']:.0f} s "
            f"(after {soak['warmup_seconds']:.0f} s of warm-up)"
        )
        ans = soak.get("answered_ms", {})
        lines.append(
            f"  answered {soak['answered']}   served {soak['served_images_per_s']:.1f} "
            f"images/s   latency ms p50 {ans.get('p50', float('nan')):.1f}  "
            f"p95 {ans.get('p95', float('nan')):.1f}  "
            f"p99 {ans.get('p99', float('nan')):.1f}"
        )
        refused_p99 = soak["refused_ms_p99"]
        lines.append(
            f"  refused 503 server_busy {soak['refused_503']}"
            + (f" (answered in p99 {refused_p99:.1f} ms)" if refused_p99 else "")
            + f"   other errors {sum(soak['errors'].values()) - soak['connection_errors']}"
            f"   connection errors {soak['connection_errors']}"
        )
        lines.append(
            f"  model runs {soak['model_runs']:.0f}, "
            f"{soak['images_per_model_run']:.1f} images per run on average "
            f"(merged by the scheduler; {soak.get('model_workers', 1):.0f} model workers)"
        )
        lines.append(
            f"  server RSS MB: {soak['rss_mb_start']:.0f} at start, "
            f"{soak['rss_mb_after_warmup']:.0f} after warm-up, "
            f"{soak['rss_mb_after_soak']:.0f} after the soak, "
            f"{soak['rss_mb_idle']:.0f} after {IDLE_S:.0f} s idle"
        )
        lines.append("")
    single = results.get("single")
    if single:
        lines.append(
            f"One image, in turns over HTTP and in process ({single['http_ms']['n']} each)"
        )
        if "prepared_ms" in single:
            lines.append(
                f"  POST /predict, prepared request p50 {single['prepared_ms']['p50']:.1f} ms"
                f"   through httpx p50 {single['http_ms']['p50']:.1f} ms"
            )
        else:
            lines.append(f"  POST /predict p50 {single['http_ms']['p50']:.1f} ms")
        lines.append(
            f"  decode+model at batch 1 in process p50 "
            f"{single['decode_and_model_ms']['p50']:.1f} ms"
            + (
                f" (decode {single['in_process_decode_ms']['p50']:.1f})"
                if "in_process_decode_ms" in single
                else ""
            )
        )
        timing = single.get("server_timing_ms")
        if timing:
            lines.append(
                "  where the prepared requests' time went (Server-Timing medians, ms): "
                + ", ".join(f"{stage} {value:.2f}" for stage, value in timing.items())
            )
        lines.append("")
    ip = results.get("in_process")
    if ip:
        lines.append(f"In process, per image (input {ip['input']}), median ms")
        no_draft_p50 = ip["decode_preprocess_ms_no_draft"]["p50"]
        lines.append(f"  decode+preprocess, no draft : {no_draft_p50:8.2f}")
        lines.append(
            f"  decode+preprocess, draft    : "
            f"{ip['decode_preprocess_ms_draft']['p50']:8.2f}   (what the service runs)"
        )
        lines.append(f"  onnxruntime inference, b=1  : {ip['inference_ms_batch1']['p50']:8.2f}")
        lines.append(
            f"  onnxruntime inference, b=32 : {ip['inference_ms_per_image_batch32']:8.2f} per image"
        )
        lines.append("")
    lines.append("Ratios (same run)")
    for name, value in results["ratios"].items():
        lines.append(f"  {name:<68} {value:8.2f}")
    return "\n".join(lines)


def pooled_batch_throughput(results: dict) -> dict[int, float]:
    """Images/s per batch size over its runs before and after the soak together: the
    soak's 60 s are one long window, each batch run a second or two."""
    runs = [results.get("batch", {}), results.get("batch_after_soak", {})]
    return {
        size: sum(run[size]["images"] for run in runs if size in run)
        / sum(run[size]["seconds"] for run in runs if size in run)
        for size in results.get("batch", {})
    }


def ratios(results: dict) -> dict[str, float]:
    batch, ip = results.get("batch", {}), results.get("in_process")
    out: dict[str, float] = {}
    if 1 in batch and 32 in batch:
        out["batch-32 / batch-1 throughput (images/s)"] = (
            batch[32]["images_per_s"] / batch[1]["images_per_s"]
        )
    if 1 in batch and 8 in batch:
        out["batch-8 / batch-1 throughput (images/s)"] = (
            batch[8]["images_per_s"] / batch[1]["images_per_s"]
        )
    latency = results.get("latency")
    if latency and "concurrent" in results:
        out["concurrent / sequential /predict throughput"] = results["concurrent"][
            "images_per_s"
        ] / (1000.0 / latency["mean"])
    if ip:
        draft = ip["decode_preprocess_ms_draft"]["p50"]
        out["draft speed-up of decode+preprocess (no draft / draft)"] = (
            ip["decode_preprocess_ms_no_draft"]["p50"] / draft
        )
        out["decode+preprocess (draft) / inference at batch 1"] = (
            draft / ip["inference_ms_batch1"]["p50"]
        )
        if latency:
            out["HTTP p50 latency / in-process (draft + inference)"] = latency["p50"] / (
                draft + ip["inference_ms_batch1"]["p50"]
            )
    single = results.get("single")
    if single:
        local = single["decode_and_model_ms"]["p50"]
        if "prepared_ms" in single:
            out["single image: HTTP p50 (prepared request) / in-process decode+model p50"] = (
                single["prepared_ms"]["p50"] / local
            )
        out["single image: HTTP p50 (httpx client) / in-process decode+model p50"] = (
            single["http_ms"]["p50"] / local
        )
    soak = results.get("soak")
    if soak and batch:
        pooled = pooled_batch_throughput(results)
        out["soak served / best single-client batch throughput (runs pooled)"] = soak[
            "served_images_per_s"
        ] / max(pooled.values())
        rows = list(batch.values()) + list(results.get("batch_after_soak", {}).values())
        best = max(row["images_per_s"] for row in rows)
        out["soak served / best single batch window (the figure until 2026-12-02)"] = (
            soak["served_images_per_s"] / best
        )
        out["soak RSS after / after warm-up"] = (
            soak["rss_mb_after_soak"] / soak["rss_mb_after_warmup"]
        )
    return out


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


SECTIONS = ("latency", "batch", "concurrent", "soak", "single", "in_process")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models/default"),
        help="bundle to serve (default: models/default)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="serve a tiny test graph instead (no trained bundle needed; "
        "preprocessing is real, inference is not)",
    )
    parser.add_argument(
        "--tiny-size",
        type=int,
        default=224,
        help="input size of the --tiny graph (default 224, like the real model)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help=f"folder of images (default: {SHARED_FULLRES}, else {FIXTURE_FULLRES})",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--requests", type=int, default=120, help="sequential /predict requests timed (default 120)"
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--batch-images", type=int, default=128, help="images sent per batch size (default 128)"
    )
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--concurrent-requests", type=int, default=120)
    parser.add_argument("--inference-runs", type=int, default=100)
    parser.add_argument(
        "--soak-clients",
        type=int,
        default=64,
        help="concurrent clients of the soak (default 64; 0 skips it)",
    )
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument(
        "--soak-warmup",
        type=float,
        default=10.0,
        help="seconds of the same load before the soak is measured",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server setting, e.g. --env INFERENCE_THREADS=2 (repeatable)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="SECTION,...",
        help="run only these sections, of "
        + ",".join(SECTIONS)
        + " (default: all; a ratio needs all the sections it compares)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.support.bundle_factory import make_tiny_bundle
    from tests.support.live_server import live_server

    batch_sizes = [int(part) for part in args.batch_sizes.split(",") if part.strip()]
    env = dict(item.split("=", 1) for item in args.env)
    env.setdefault("MAX_BATCH_FILES", str(max([*batch_sizes, 32])))
    folder, samples = find_images(args.images)

    with ExitStack() as stack:
        if args.tiny:
            model_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-")))
            make_tiny_bundle(model_dir, size=args.tiny_size)
        else:
            model_dir = args.model_dir
            try:
                read_bundle(model_dir)
            except BundleError as exc:
                print(
                    f"{exc}\n\nNo trained bundle: run with --tiny to benchmark the service "
                    "on a tiny test graph (real preprocessing, trivial inference).",
                    file=sys.stderr,
                )
                return 2
        meta = read_bundle(model_dir)
        print(
            f"starting the service on {model_dir} ({meta.name} {meta.version}) ...", file=sys.stderr
        )
        server = stack.enter_context(
            live_server(model_dir.resolve(), env=env, timeout=180, cli=True)
        )
        samples, refused = scored_samples(server.base_url, samples)
        if refused:
            print(
                f"the service refused {sum(refused.values())} image(s) {refused}; timing "
                f"the {len(samples)} it scores",
                file=sys.stderr,
            )
        results: dict[str, Any] = {
            "setup": {
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "bundle": str(args.model_dir if not args.tiny else "tiny test graph (--tiny)"),
                "model": f"{meta.name} {meta.version}, backbone {meta.backbone}",
                "input": f"{meta.input.height}x{meta.input.width}",
                "tiny": bool(args.tiny),
                "images": str(folder),
                "n_images": len(samples),
                "refused_by_the_service": refused,
                "server_env": env,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}",
                "load_before": _load(),
            }
        }
        only = set(args.only.split(",")) if args.only else set(SECTIONS)
        if "latency" in only:
            print("sequential /predict ...", file=sys.stderr)
            results["latency"] = bench_latency(server.base_url, samples, args.warmup, args.requests)
        if "batch" in only:
            print("batches ...", file=sys.stderr)
            results["batch"] = bench_batches(
                server.base_url, samples, batch_sizes, args.batch_images, warmup=2
            )
        if "concurrent" in only:
            print(f"{args.threads} client threads ...", file=sys.stderr)
            results["concurrent"] = bench_concurrent(
                server.base_url, samples, args.threads, args.concurrent_requests
            )
        if "soak" in only and args.soak_clients > 0:
            print(
                f"soak: {args.soak_clients} clients, {args.soak_warmup:.0f} s warm-up + "
                f"{args.soak_seconds:.0f} s ...",
                file=sys.stderr,
            )
            results["soak"] = bench_soak(
                server, samples, args.soak_clients, args.soak_seconds, args.soak_warmup
            )
            if "batch" in only:
                print("batches again, after the soak ...", file=sys.stderr)
                results["batch_after_soak"] = bench_batches(
                    server.base_url, samples, batch_sizes, args.batch_images, warmup=1
                )
        if "single" in only:
            print("single image, HTTP and in process alternately ...", file=sys.stderr)
            results["single"] = bench_single_interleaved(
                server.base_url, model_dir, samples, args.requests
            )
        if "in_process" in only:
            print("in process ...", file=sys.stderr)
            results["in_process"] = bench_in_process(model_dir, samples, args.inference_runs)
        results["ratios"] = ratios(results)
        results["setup"]["load_after"] = _load()

    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
