"""service.config.Settings: environment, validation, and the docs' settings tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.inference import ModelRunner

REPO = Path(__file__).resolve().parents[2]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_TYPES", " JPG , png ")
    monkeypatch.setenv("api_key", "")
    monkeypatch.setenv("MAX_BATCH_FILES", "7")
    monkeypatch.setenv("PROVIDERS", "cpu")
    settings = Settings()
    assert settings.allowed_types == ["jpeg", "png"]
    assert settings.api_key is None
    assert settings.max_batch_files == 7
    assert settings.decode_limits().allowed_formats == frozenset({"jpeg", "png"})
    monkeypatch.setenv("ALLOWED_TYPES", "jpeg,gif")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("doc", ["docs/api.md", "README.md"])
def test_every_setting_is_documented(doc: str) -> None:
    """Each setting has a row `| `NAME` | default | description... |` in the docs, whose
    text includes the description in service/config.py."""
    text = (REPO / doc).read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        row = re.search(rf"^\| `{name.upper()}` \|[^|]*\|(.*)\|$", text, re.MULTILINE)
        assert row, f"{doc} has no row for {name.upper()}"
        assert field.description in row.group(1), (doc, name, row.group(1))


def test_log_levels_accepted_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import LOG_LEVELS

    for doc in ("docs/api.md", "README.md"):
        row = re.search(r"^\| `LOG_LEVEL` \|.*$", (REPO / doc).read_text(), re.MULTILINE)
        assert row, doc
        documented = set(re.findall(r"\b(critical|error|warning|info|debug|trace)\b", row.group(0)))
        assert documented == set(LOG_LEVELS), doc
    for level in LOG_LEVELS:
        monkeypatch.setenv("LOG_LEVEL", level.upper())
        assert Settings().log_level == level
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError, match="trace"):
        Settings()


def test_scheduler_settings_reach_the_runner(tiny_bundle: Path) -> None:
    settings = Settings(
        model_dir=tiny_bundle,
        max_queue=7,
        max_batch_size=3,
        max_batch_wait_ms=2.5,
        inference_threads=2,
    )
    runner = ModelRunner(settings)
    try:
        assert runner.admission.max_images == 7
        assert runner.scheduler.max_batch_size == 3
        assert runner.scheduler.max_wait_s == pytest.approx(0.0025)
        assert runner.executor._max_workers == 2
    finally:
        runner.close()
