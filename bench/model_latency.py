"""onnxruntime latency of model bundles on this CPU: the model-choice column of docs/models.md.

    python -m bench.model_latency models/default runs/xception-bundle ...

For each bundle: median and p90 ms per call at batch 1, and ms per image at batch 16, on
real X-rays prepared by the service's preprocessing (decode time excluded: it is the same
for every model and is measured by bench.service_bench). Ratios are to the first bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.service_bench import find_images
from service.bundle import INPUT_NAME, read_bundle
from service.config import Settings
from service.onnx_session import SessionThreads, make_session
from service.preprocessing import load_model_input


def xray_bytes(limit: int = 16) -> list[bytes]:
    _, samples = find_images(None)
    return [sample.data for sample in samples[:limit]]


def time_calls(session: ort.InferenceSession, batch: np.ndarray, runs: int) -> list[float]:
    session.run(None, {INPUT_NAME: batch})  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    args = parser.parse_args()
    # The service's session options (inter-op threads, no spinning), intra-op from --threads.
    service = SessionThreads.of(Settings.model_construct())
    threads = dataclasses.replace(service, intra_op=args.threads)

    images = xray_bytes()
    print(f"CPU cores: {os.cpu_count()}, onnxruntime {ort.__version__}, {len(images)} real X-rays")
    print(
        f"{'bundle':40s} {'input':>7s} {'b1 median ms':>13s} {'b1 p90 ms':>10s} "
        f"{'b16 ms/img':>11s} {'MB':>6s}"
    )
    baseline = None
    for directory in args.bundles:
        meta = read_bundle(directory)
        size = meta.input.height
        session = make_session(directory / "model.onnx", threads)
        inputs = np.stack([load_model_input(b, size, meta.input.width) for b in images])
        single = time_calls(session, inputs[:1], args.runs)
        batch = time_calls(session, inputs[:16], max(5, args.runs // 5))
        median = statistics.median(single)
        p90 = float(np.percentile(single, 90))
        per_image = statistics.median(batch) / 16
        megabytes = (directory / "model.onnx").stat().st_size / 1e6
        baseline = baseline or median
        print(
            f"{directory!s:40s} {size:>7d} {median:13.1f} {p90:10.1f} {per_image:11.1f} "
            f"{megabytes:6.1f}  ({median / baseline:.2f}x the first at batch 1)"
        )


if __name__ == "__main__":
    main()
