"""What explain=true costs: /predict?explain=true against a plain /predict, over real HTTP.

    python -m bench.explain_bench --model-dir models/default        # a format 2 bundle
    python -m bench.explain_bench --untrained-mobilenet             # no trained bundle needed

Starts the service (tests/support/live_server.py) on the bundle and sends the full-resolution
X-rays of ../shared/data/chest_xray_fullres (else tests/fixtures/fullres), each once
plain and once with explain=true, in alternating order, after a warm-up; reports the p50
and p95 latency of both and their ratio (target: explain p50 <= 1.3 x plain p50).

`--untrained-mobilenet` exports, with `export_run`, the real MobileNet 224 classifier
with random weights on a run folder of the test fixtures (tests/support/run_factory.py; needs the
train extra): the inference, the gate and the heatmap cost what they cost for the shipped
model, since costs do not depend on the weights. The gate is switched off for it (an
untrained model's gate says nothing), so every image is scored and drawn. A benchmark,
not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from bench.service_bench import find_images


def untrained_mobilenet(directory: Path) -> Path:
    from export.onnx_export import export_run
    from tests.support.run_factory import make_untrained_run

    data = TESTS_DIR / "fixtures" / "chest_xray"
    run = make_untrained_run(directory / "run", data, 224, directory / "cache")
    export_run(
        run,
        directory / "bundle",
        data,
        version="0.0.0-untrained",
        cache_dir=directory / "cache",
        gate_rotation_images=64,
    )
    return directory / "bundle"


def measure(base_url: str, images: list, rounds: int, warmup: int) -> dict:
    times: dict[str, list[float]] = {"plain": [], "explain": []}
    refused = 0
    with httpx.Client(base_url=base_url, timeout=120) as client:

        def post(sample, explain: bool) -> tuple[int, float]:
            started = time.perf_counter()
            response = client.post(
                "/predict",
                params={"explain": "true"} if explain else {},
                files={"file": (sample.name, sample.data)},
            )
            response.read()
            return response.status_code, (time.perf_counter() - started) * 1000

        for sample in images[:warmup]:
            post(sample, False)
            post(sample, True)
        for i in range(rounds):
            for j, sample in enumerate(images):
                order = (False, True) if (i + j) % 2 == 0 else (True, False)
                results = {explain: post(sample, explain) for explain in order}
                if any(status != 200 for status, _ in results.values()):
                    refused += 1
                    continue
                times["plain"].append(results[False][1])
                times["explain"].append(results[True][1])

    def summary(values: list[float]) -> dict:
        return (
            {
                "n": len(values),
                "p50": statistics.median(values),
                "p95": float(np.percentile(values, 95)),
            }
            if values
            else {"n": 0}
        )

    plain, explain = summary(times["plain"]), summary(times["explain"])
    ratio = explain["p50"] / plain["p50"] if plain["n"] else float("nan")
    return {"plain": plain, "explain": explain, "ratio_p50": ratio, "pairs_not_200": refused}


def gate_cost(images: list, feature_dim: int = 1024) -> dict[str, float]:
    """In process, median ms per image: the gate's header/thumbnail read, and its
    projection of `feature_dim` features on 64 components and Mahalanobis distances to
    5 classes (the MobileNet gate's shape)."""
    from service.gate import GateStats
    from service.image_facts import read_facts

    rng = np.random.default_rng(0)
    k = 64
    a = rng.normal(size=(k, k)) / np.sqrt(k)
    basis = np.linalg.qr(rng.normal(size=(feature_dim, k)))[0]
    stats = GateStats(
        tuple(f"C{i}" for i in range(5)),
        rng.normal(size=feature_dim),
        basis,
        rng.normal(size=(5, k)),
        a @ a.T + np.eye(k),
    )
    facts_ms, distance_ms = [], []
    for sample in images:
        started = time.perf_counter()
        read_facts(sample.data)
        facts_ms.append((time.perf_counter() - started) * 1000)
        features = rng.normal(size=(1, feature_dim))
        started = time.perf_counter()
        stats.distances(features)
        distance_ms.append((time.perf_counter() - started) * 1000)
    return {"facts": statistics.median(facts_ms), "distances": statistics.median(distance_ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--untrained-mobilenet", action="store_true")
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)

    from tests.support.live_server import live_server

    env = dict(item.split("=", 1) for item in args.env)
    with ExitStack() as stack:
        model_dir = args.model_dir
        if args.untrained_mobilenet:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="explain-")))
            model_dir = untrained_mobilenet(scratch)
            env.setdefault("GATE_ENABLED", "false")
        folder, images = find_images(args.images)
        server = stack.enter_context(live_server(model_dir, env=env, timeout=120))
        results = measure(server.base_url, images, args.rounds, args.warmup)
    print(
        f"bundle {model_dir if not args.untrained_mobilenet else 'untrained MobileNet 224'}"
        f", {len(images)} images from {folder}, settings {env or 'default'}"
    )
    for name in ("plain", "explain"):
        r = results[name]
        print(
            f"  POST /predict{'?explain=true' if name == 'explain' else '':14s} "
            f"n {r['n']:4d}  p50 {r.get('p50', float('nan')):7.1f} ms  "
            f"p95 {r.get('p95', float('nan')):7.1f} ms"
        )
    print(
        f"  explain / plain p50: {results['ratio_p50']:.2f}   (pairs not answered 200: "
        f"{results['pairs_not_200']})"
    )
    cost = gate_cost(images)
    print(
        f"  in process, median per image: gate facts (header, colour thumbnail) "
        f"{cost['facts']:.2f} ms, 1024 features -> 64 components -> Mahalanobis to 5 classes "
        f"{cost['distances']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
