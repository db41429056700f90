"""The decode attacks of issue 8 against the real service: time and server memory.

    python -m bench.bombs                       # tiny test graph (decoding is what is attacked)
    python -m bench.bombs --model-dir models/default
    python -m bench.bombs --only dicom-deflated-bomb --modes single

Starts the service under uvicorn on a free loopback port (tests/support/live_server.py)
and sends each attack, generated on the fly (tests/support/attack_images.py,
tests/support/dicom_factory.py), three ways: one /predict; one /predict/batch of several
copies; several clients at once (/predict each) while one normal X-ray is sent beside
them. For each it reports the wall time, the answers (status and error code), and the
server's resident memory: its peak during the attack (VmHWM, reset before each attack
through /proc/<pid>/clear_refs) and what is left after it (VmRSS). Memory is also read
after a warm-up of normal requests, after all attacks, and after normal requests again
(is memory given back?).

Every loop is bounded; only 127.0.0.1 is contacted. A benchmark, not a test: it asserts
nothing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.attack_images import black_png, png_rgba16, progressive_jpeg, twenty_byte_jpeg
from tests.support.dicom_factory import deflated_dicom_bomb
from tests.support.proc_memory import MB, peak_bytes, reset_peak, rss_bytes

FULLRES = TESTS_DIR / "fixtures" / "fullres"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Attack:
    name: str
    build: Callable[[], bytes]
    filename: str
    batch: int  # copies in the batched request
    what: str


ATTACKS = [
    Attack(
        "dicom-deflated-bomb",
        lambda: deflated_dicom_bomb(512 * MiB),
        "bomb.dcm",
        4,
        "Deflated DICOM, 16384x16384 16-bit declared, inflates to 512 MiB",
    ),
    Attack(
        "dicom-deflated-lying",
        lambda: deflated_dicom_bomb(512 * MiB, (512, 512)),
        "lying.dcm",
        4,
        "Deflated DICOM declaring 512x512 but carrying 512 MiB",
    ),
    Attack(
        "jpeg-progressive-500-scans",
        lambda: progressive_jpeg(4096, 500),
        "scans.jpeg",
        4,
        "progressive 4096x4096 grey JPEG, 500 scans",
    ),
    Attack(
        "png-rgba16-6320",
        png_rgba16,
        "rgba16.png",
        32,
        "16-bit RGBA PNG 6320x6320 (under MAX_PIXELS)",
    ),
    Attack(
        "png-grey-30000",
        lambda: black_png(30000, 30000),
        "grey.png",
        4,
        "8-bit grey PNG 30000x30000 (over MAX_PIXELS)",
    ),
    Attack(
        "jpeg-20-bytes",
        twenty_byte_jpeg,
        "tiny.jpeg",
        4,
        "20 bytes: JPEG magic, a DQT marker, zeros",
    ),
    # Not attacks: large images that must still be answered; is their memory given back?
    Attack(
        "large-png-grey16-4096",
        lambda: black_png(4096, 4096, 16),
        "large.png",
        8,
        "valid 16-bit grey PNG 4096x4096 (32 MiB decoded)",
    ),
    Attack(
        "large-dicom-deflated-4096",
        lambda: deflated_dicom_bomb(32 * MiB),
        "large.dcm",
        8,
        "valid Deflated DICOM 4096x4096 16-bit (32 MiB of pixels)",
    ),
]
MODES = ("single", "batch", "concurrent")


def _answers(response: Any) -> list[str]:
    """'status code' of a response, or of each entry of a batch answer."""
    try:
        body = response.json()
    except ValueError:
        return [f"{response.status_code} (not JSON)"]
    if response.status_code == 200 and "results" in body:
        return [
            f"200/{r['error']['code']}" if r.get("error") else "200/ok" for r in body["results"]
        ]
    if "error" in body:
        return [f"{response.status_code} {body['error']['code']}"]
    return [str(response.status_code)]


def _post(base_url: str, path: str, files: list, timeout: float) -> tuple[list[str], float]:
    import httpx

    started = time.perf_counter()
    try:
        with httpx.Client(base_url=base_url, timeout=timeout) as http:
            response = http.post(path, files=files)
        answers = _answers(response)
    except httpx.HTTPError as exc:
        answers = [f"client error {type(exc).__name__}"]
    return answers, time.perf_counter() - started


def _normal_files(field: str = "file") -> list:
    path = min(FULLRES.glob("*.jpeg"))
    return [(field, (path.name, path.read_bytes(), "image/jpeg"))]


def normal_load(base_url: str, requests: int, threads: int = 4) -> float:
    """`requests` normal /predict uploads of full-resolution X-rays; seconds taken."""
    images = [(p.name, p.read_bytes()) for p in sorted(FULLRES.glob("*.jpeg"))]
    started = time.perf_counter()

    def one(i: int) -> list[str]:
        name, data = images[i % len(images)]
        return _post(base_url, "/predict", [("file", (name, data, "image/jpeg"))], 60)[0]

    with ThreadPoolExecutor(threads) as pool:
        answers = [a for chunk in pool.map(one, range(requests)) for a in chunk]
    bad = [a for a in answers if a != "200"]
    if bad:
        print(f"warning: normal requests answered {Counter(bad)}", file=sys.stderr)
    return time.perf_counter() - started


def run_attack(
    base_url: str, pid: int, attack: Attack, mode: str, clients: int, timeout: float
) -> dict[str, Any]:
    data = attack.build()
    reset = reset_peak(pid)
    rss_before = rss_bytes(pid)
    normal_s = None
    if mode == "single":
        answers, seconds = _post(
            base_url,
            "/predict",
            [("file", (attack.filename, data, "application/octet-stream"))],
            timeout,
        )
    elif mode == "batch":
        files = [("files", (attack.filename, data, "application/octet-stream"))] * attack.batch
        answers, seconds = _post(base_url, "/predict/batch", files, timeout)
    else:
        files = [("file", (attack.filename, data, "application/octet-stream"))]
        started = time.perf_counter()
        with ThreadPoolExecutor(clients + 1) as pool:
            attacks = [
                pool.submit(_post, base_url, "/predict", files, timeout) for _ in range(clients)
            ]
            time.sleep(0.05)  # the normal request arrives while the attacks are in flight
            normal = pool.submit(_post, base_url, "/predict", _normal_files(), timeout)
            answers = [a for future in attacks for a in future.result()[0]]
            normal_answers, normal_s = normal.result()
            if normal_answers != ["200"]:
                answers.append(f"normal: {normal_answers[0]}")
        seconds = time.perf_counter() - started
    return {
        "attack": attack.name,
        "mode": mode,
        "upload_bytes": len(data),
        "requests": 1 if mode != "concurrent" else clients,
        "images": {"single": 1, "batch": attack.batch, "concurrent": clients}[mode],
        "seconds": seconds,
        "normal_request_s": normal_s,
        "answers": dict(Counter(answers)),
        "rss_before_mb": rss_before / MB,
        "peak_mb": peak_bytes(pid) / MB if reset else None,
        "rss_after_mb": rss_bytes(pid) / MB,
    }


def report(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        f"bomb corpus, {setup['when']}, {setup['machine']}, bundle: {setup['bundle']}",
        (
            f"server env: {setup['server_env'] or '(defaults)'}; load average before "
            f"{setup['load_before']}, after {setup['load_after']}"
        ),
        "",
        (
            f"{'attack':28s} {'mode':10s} {'upload':>9s} {'imgs':>4s} {'time s':>7s} "
            f"{'peak MB':>8s} {'after MB':>8s} {'normal s':>8s}  answers"
        ),
    ]
    for row in results["attacks"]:
        peak = f"{row['peak_mb']:8.0f}" if row["peak_mb"] is not None else f"{'n/a':>8s}"
        normal = f"{row['normal_request_s']:8.2f}" if row["normal_request_s"] else f"{'':8s}"
        answers = ", ".join(f"{k} x{v}" for k, v in row["answers"].items())
        lines.append(
            f"{row['attack']:28s} {row['mode']:10s} {row['upload_bytes'] / 1000:7.0f}KB "
            f"{row['images']:4d} {row['seconds']:7.2f} {peak} {row['rss_after_mb']:8.0f} "
            f"{normal}  {answers}"
        )
    memory = results["memory"]
    lines += [
        "",
        "server RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()),
    ]
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="bundle to serve (default: a tiny test graph; decoding, which "
        "is what these attacks hit, is the real one either way)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=[a.name for a in ATTACKS],
        help="run only these (repeatable)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}"
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="clients at once in the concurrent mode (default 8)"
    )
    parser.add_argument(
        "--normal-requests",
        type=int,
        default=60,
        help="normal /predict requests for warm-up and after (default 60)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="server setting, e.g. --env MAX_JPEG_SCANS=1000 (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.support.bundle_factory import make_tiny_bundle
    from tests.support.live_server import live_server

    env = dict(item.split("=", 1) for item in args.env)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    attacks = [a for a in ATTACKS if not args.only or a.name in args.only]
    with ExitStack() as stack:
        if args.model_dir is None:
            model_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-")))
            make_tiny_bundle(model_dir, size=224)
            bundle = "tiny test graph, 224 px"
        else:
            model_dir, bundle = args.model_dir.resolve(), str(args.model_dir)
        server = stack.enter_context(live_server(model_dir, env=env, timeout=180))
        pid = server.process.pid
        results: dict[str, Any] = {
            "setup": {
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "bundle": bundle,
                "server_env": env,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}",
                "load_before": _load(),
            },
            "attacks": [],
            "memory": {},
        }
        memory = results["memory"]
        memory["ready"] = rss_bytes(pid) / MB
        normal_load(server.base_url, args.normal_requests)
        memory["after warm-up"] = rss_bytes(pid) / MB
        for attack in attacks:
            for mode in modes:
                print(f"{attack.name} {mode} ...", file=sys.stderr)
                results["attacks"].append(
                    run_attack(server.base_url, pid, attack, mode, args.clients, args.timeout)
                )
        memory["after attacks"] = rss_bytes(pid) / MB
        normal_load(server.base_url, args.normal_requests)
        memory["after normal requests again"] = rss_bytes(pid) / MB
        memory["peak of the last phase"] = peak_bytes(pid) / MB
        results["setup"]["load_after"] = _load()
        log_tail = server.log()[-2000:]
    print(report(results))
    if "Traceback" in log_tail:
        print("\nserver log tail:\n" + log_tail, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
