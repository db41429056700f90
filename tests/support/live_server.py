"""Run the real service under uvicorn in a subprocess, for end-to-end tests and benchmarks.

    with live_server(bundle_dir, env={"API_KEY": "secret"}) as server:
        httpx.get(f"{server.base_url}/health")

With `cli=True` the server is `python -m service.cli serve` instead (what `pneumoscreen
serve` runs: uvicorn with the HTTP budgets of service/http_protocol.py and the SIGTERM
drain of service/server.py).

The server gets a free port on 127.0.0.1, MODEL_DIR and the given environment. On entry
the helper waits until the liveness route answers (and, with `wait_ready`, until /health
is 200); on exit it stops the process. When start-up fails, the server's log is printed
so the test output says why.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
LIVENESS_PATH = "/livez"
HEALTH_PATH = "/health"


class ServerStartError(RuntimeError):
    """The server process exited or did not become live/ready in time."""


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def url(self, path: str) -> str:
        return self.base_url + path


def raw_multipart_request(
    path: str, files: list[tuple[str, Any]], host: str = "127.0.0.1"
) -> bytes:
    """A whole HTTP/1.1 POST of `files` (httpx's `files=` form) to `path`, as the bytes a
    client sends (keep-alive): for tests and benchmarks that write to a socket themselves."""
    request = httpx.Request("POST", f"http://{host}{path}", files=files)
    body = request.read()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: {request.headers['content-type']}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child process we started and reap it; kill it if it will not stop."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(server: LiveServer, path: str, want_status: int | None, deadline: float) -> None:
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"server exited with code {server.process.returncode} before {path} answered"
            )
        try:
            response = httpx.get(server.url(path), timeout=2.0)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if want_status is None or response.status_code == want_status:
                return
            last = f"{response.status_code} {response.text[:300]}"
        time.sleep(0.05)
    raise ServerStartError(f"{path} did not answer as expected in time (last: {last})")


@contextlib.contextmanager
def live_server(
    model_dir: Path,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60.0,
    cli: bool = False,
) -> Iterator[LiveServer]:
    """Start `uvicorn service.main:create_app --factory` (or, with `cli`, `pneumoscreen
    serve`) on a free port; stop it on exit."""
    port = free_port()
    child_env = dict(os.environ)
    # Settings from the developer's shell must not leak into tests.
    for name in (
        "API_KEY",
        "PROVIDERS",
        "MAX_FILE_BYTES",
        "MAX_REQUEST_BYTES",
        "MAX_BATCH_FILES",
        "MAX_PIXELS",
        "MIN_IMAGE_SIDE",
        "ALLOWED_TYPES",
        "MAX_QUEUE",
        "MAX_BATCH_SIZE",
        "MAX_BATCH_WAIT_MS",
        "REQUEST_TIMEOUT_S",
        "DRAIN_TIMEOUT_S",
        "MAX_HEADER_BYTES",
        "MAX_HEADERS",
        "HEADER_TIMEOUT_S",
        "BODY_TIMEOUT_S",
        "KEEP_ALIVE_TIMEOUT_S",
        "MAX_CONNECTIONS",
        "HOST",
        "PORT",
        "WORKERS",
        "INFERENCE_THREADS",
        "INTRA_OP_THREADS",
        "MAX_DECODED_BYTES",
        "MAX_JPEG_SCANS",
        "DECODE_MEMORY_BUDGET_BYTES",
        "DECODE_BUDGET_WAIT_S",
        "GATE_ENABLED",
        "INTRA_OP_SPINNING",
        "LONE_REQUEST_SPINNING",
    ):
        child_env.pop(name, None)
    child_env.update(
        {
            "MODEL_DIR": str(model_dir),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
            ),
        }
    )
    child_env.update(env or {})
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in finally
        prefix=f"pneumoscreen-{port}-", suffix=".log", delete=False
    )
    if cli:
        command = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
            "--no-access-log",  # as `pneumoscreen serve`: the app logs each request itself
        ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=child_env, stdout=log_file, stderr=subprocess.STDOUT
    )
    server = LiveServer(
        base_url=f"http://127.0.0.1:{port}",
        process=process,
        port=port,
        log_path=Path(log_file.name),
        env=dict(env or {}),
    )
    try:
        try:
            deadline = time.monotonic() + timeout
            _wait(server, LIVENESS_PATH, 200, deadline)
            if wait_ready:
                _wait(server, HEALTH_PATH, 200, deadline)
        except ServerStartError as exc:
            print(
                f"--- pneumoscreen server log ({server.log_path}) ---\n{server.log()}",
                file=sys.stderr,
            )
            raise ServerStartError(f"{exc}; server log:\n{server.log()[-4000:]}") from None
        yield server
    finally:
        stop_process(process)
        log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(log_file.name)
