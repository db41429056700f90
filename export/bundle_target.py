"""Where `pneumoscreen export` may write a bundle.

The served model is a bundle folder too (models/default), so one export command must never
overwrite it by accident: the default folder is new (inside the run), and an existing
bundle is replaced only with --force. Checked before the conversion starts, so a refusal
costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from service.bundle import META_FILE

DEFAULT_BUNDLE_FOLDER = "bundle"  # <run>/bundle: next to the run that made it


class TargetRefused(Exception):
    """The folder cannot take the bundle; the message says why and what to do."""


def default_out(run_dir: Path) -> Path:
    return run_dir / DEFAULT_BUNDLE_FOLDER


def check_target(out: Path, force: bool, option: str = "--out") -> None:
    """Refuse an existing non-empty folder without `force`, and anything but a bundle or an
    empty folder with it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TargetRefused(f"{option} {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not (out / META_FILE).is_file():
        raise TargetRefused(
            f"{option} {out} exists and is not a model bundle; choose a new "
            "folder (--force only replaces a bundle)"
        )
    if not force:
        raise TargetRefused(
            f"{option} {out} already holds a bundle; pass --force to replace "
            "it (is it the one being served?)"
        )
