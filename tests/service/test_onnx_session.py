"""service.onnx_session: the one session factory, and that every caller builds through it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import inference
from service.config import Settings
from service.inference import ModelRunner
from service.onnx_session import (
    CPU,
    CUDA,
    ONNXRUNTIME_DEFAULTS,
    SessionThreads,
    choose_providers,
    make_session,
)

REPO = Path(__file__).resolve().parents[2]
SPINNING = "session.intra_op.allow_spinning"


def test_default_session_is_cpu_with_onnxruntime_defaults(tiny_bundle: Path) -> None:
    session = make_session(tiny_bundle / "model.onnx")
    options = session.get_session_options()
    assert session.get_providers() == [CPU]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (0, 0)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry(SPINNING)  # left to onnxruntime


def test_service_threads_come_from_the_settings(tiny_bundle: Path) -> None:
    settings = Settings(
        model_dir=tiny_bundle, intra_op_threads=2, inter_op_threads=3, intra_op_spinning=True
    )
    assert SessionThreads.of(settings) == SessionThreads(2, 3, True)
    assert SessionThreads.lone_of(settings) == SessionThreads(2, 3, True, True)
    settings.intra_op_spinning = False
    assert SessionThreads.lone_of(settings) == SessionThreads(2, 3, True, True)  # always spins
    options = make_session(
        tiny_bundle / "model.onnx", SessionThreads(2, 3, False)
    ).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    assert options.get_session_config_entry(SPINNING) == "0"


def test_runner_builds_its_session_through_the_factory(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    def spy(
        path: Any, threads: SessionThreads = ONNXRUNTIME_DEFAULTS, providers: Any = (CPU,)
    ) -> Any:
        calls.append((Path(path), threads, list(providers)))
        return make_session(path, threads, providers)

    monkeypatch.setattr(inference, "make_session", spy)
    runner = ModelRunner(
        Settings(
            model_dir=tiny_bundle,
            providers="cpu",
            intra_op_threads=1,
            inter_op_threads=1,
            intra_op_spinning=False,
        )
    )
    try:
        runner.load()
        assert runner.state == "ready", runner.error
    finally:
        runner.close()
    # The serving session, then the lone-request one (LONE_REQUEST_SPINNING, on the CPU).
    assert calls == [
        (tiny_bundle / "model.onnx", SessionThreads(1, 1, False), [CPU]),
        (tiny_bundle / "model.onnx", SessionThreads(1, 1, True, True), [CPU]),
    ]
    model = runner.model
    assert model is not None and model.lone_session is not None
    assert model.session.get_session_options().get_session_config_entry(SPINNING) == "0"
    lone = model.lone_session.get_session_options()
    assert lone.get_session_config_entry(SPINNING) == "1"
    assert lone.get_session_config_entry("session.force_spinning_stop") == "1"


def test_the_lone_session_is_the_same_model(tiny_bundle: Path) -> None:
    """A lone image's answer does not depend on the session it ran on; switched off, there
    is no second session."""
    images = np.random.default_rng(4).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    for spinning in (True, False):
        runner = ModelRunner(
            Settings(model_dir=tiny_bundle, providers="cpu", lone_request_spinning=spinning)
        )
        runner.load()
        try:
            model = runner.require_model()
            assert (model.lone_session is not None) is spinning
            lone, batch = model.run_lone(images), model.run(images)
            assert lone.keys() == batch.keys()
            for name in lone:
                np.testing.assert_allclose(lone[name], batch[name], rtol=1e-6, atol=1e-7)
            (outputs,) = runner.run_if_idle(list(images), model) or []
            np.testing.assert_allclose(outputs.probabilities, batch["probabilities"][0], rtol=1e-6)
        finally:
            runner.close()


CALLERS = [
    "service/inference.py",
    "export/onnx_export.py",
    "export/quantize.py",
    "bench/service_bench.py",
    "bench/model_latency.py",
    "tests/support/bundle_factory.py",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "tests/export").glob("test_*.py")),
]


@pytest.mark.parametrize("path", CALLERS)
def test_sessions_are_built_only_by_the_factory(path: str) -> None:
    """No caller builds an InferenceSession or SessionOptions of its own; the ones that
    build a session import make_session from service.onnx_session."""
    tree = ast.parse((REPO / path).read_text())
    own = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) in ("InferenceSession", "SessionOptions")
    ]
    assert own == [], f"{path}: builds its own session at lines {own}"
    imports = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "service.onnx_session"
        for alias in node.names
    }
    calls = any(
        isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_session"
        for node in ast.walk(tree)
    )
    if not path.startswith("tests/export/"):  # these build sessions; a test file may not
        assert calls, f"{path}: no make_session call"
    if calls:
        assert "make_session" in imports, path


def test_providers_choice() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        choose_providers("cuda", [CPU])
