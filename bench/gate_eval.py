"""How often the input gate accepts real X-rays and refuses everything else.

    python -m bench.gate_eval --model-dir models/default \\
        --run runs/<run> --data ../shared/data/chest_xray          # + the run's validation split
    python -m bench.gate_eval --model-dir models/default --json gate_eval.json

Runs the service's own pipeline in process (service.screening.prepare: decode, DICOM tags
and pixel checks; one onnxruntime run per batch; service.screening.judge: the feature
gate), on:

- X-rays, which should all be accepted: the run's validation split (with --run/--data),
  the official val split and the full-resolution originals of ../shared/data, the test
  fixtures;
- the same X-rays rotated by 90, 180 and 270 degrees, which should all be refused;
- images that are not chest X-rays, which should all be refused: the sample images
  shipped inside installed Python packages (matplotlib, scikit-learn, scikit-image when
  installed), the PNG/JPEG images of /usr/share (icons, documentation figures), and
  generated ones (noise, gradients, shapes, text pages rendered with Pillow, colour
  pictures, a CT-like phantom).

A tiny test bundle gives meaningless figures: use a trained bundle. Nothing is
downloaded; only files on this machine are read. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from service.config import Settings
from service.errors import ApiError
from service.gate import GateRefusal
from service.inference import ModelRunner
from service.preprocessing import ImageError
from service.screening import Prepared, judge, prepare

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
BATCH = 32


@dataclass
class Source:
    name: str
    want: str  # "accepted" or "refused"
    items: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Tally:
    n: int = 0
    accepted: int = 0
    codes: Counter = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)


# --- sources ----------------------------------------------------------------------------


def _files(folder: Path, limit: int | None = None) -> list[tuple[str, bytes]]:
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None and len(paths) > limit:
        paths = paths[:: len(paths) // limit][:limit]
    return [(str(p), p.read_bytes()) for p in paths]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def validation_split(run: Path, data: Path) -> list[tuple[str, bytes]]:
    from training.data import split_samples
    from training.run_record import read_run

    samples = split_samples(run, data, "validation", len(read_run(run).labels))
    return [(str(s.path), s.path.read_bytes()) for s in samples]


def rotated(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    turns = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_270,
    }
    out = []
    for name, data in items:
        if name.lower().endswith(".dcm"):
            continue
        image = Image.open(io.BytesIO(data)).convert("L")
        for degrees, turn in turns.items():
            out.append((f"{name} @{degrees}", _jpeg(image.transpose(turn))))
    return out


def package_images() -> list[tuple[str, bytes]]:
    """Sample images shipped inside installed packages (no download)."""
    items: list[tuple[str, bytes]] = []
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        items += _files(sample)
        mri = sample / "s1045.ima.gz"  # an MRI slice, 256 x 256, 16-bit big-endian
        if mri.is_file():
            pixels = np.frombuffer(gzip.decompress(mri.read_bytes()), ">u2").reshape(256, 256)
            scaled = (pixels.astype(np.float64) * 255 / max(1, pixels.max())).astype(np.uint8)
            items.append((str(mri), _png(Image.fromarray(scaled))))
    except ImportError:
        pass
    try:
        import sklearn

        items += _files(Path(sklearn.__file__).parent / "datasets" / "images")
    except ImportError:
        pass
    try:
        import skimage

        items += _files(Path(skimage.__file__).parent / "data")
    except ImportError:
        pass
    return items


def _size(data: bytes) -> tuple[int, int]:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - a broken file is not a sample
        return (0, 0)


def system_images(limit: int) -> list[tuple[str, bytes]]:
    """PNG/JPEG images of Debian packages in /usr/share, at least 64 px a side."""
    items = []
    for name, data in _files(Path("/usr/share"), None):
        if min(_size(data)) >= 64:
            items.append((name, data))
    if len(items) > limit:
        items = items[:: len(items) // limit][:limit]
    return items


def generated_images(seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[str, bytes]] = []
    side = 512
    yy, xx = np.mgrid[0:side, 0:side] / side
    out.append(
        (
            "noise uniform",
            _png(Image.fromarray(rng.integers(0, 256, (side, side)).astype(np.uint8))),
        )
    )
    out.append(
        (
            "noise gaussian",
            _png(
                Image.fromarray(np.clip(rng.normal(128, 40, (side, side)), 0, 255).astype(np.uint8))
            ),
        )
    )
    out.append(
        (
            "noise colour",
            _png(Image.fromarray(rng.integers(0, 256, (side, side, 3)).astype(np.uint8))),
        )
    )
    for name, ramp in (
        ("gradient horizontal", xx),
        ("gradient vertical", yy),
        ("gradient radial", np.hypot(xx - 0.5, yy - 0.5) * 1.4),
        ("gradient diagonal", (xx + yy) / 2),
    ):
        out.append((name, _png(Image.fromarray((np.clip(ramp, 0, 1) * 255).astype(np.uint8)))))
    for value in (0, 128, 255):
        out.append((f"uniform {value}", _png(Image.new("L", (side, side), value))))
    checker = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2 * 255).astype(np.uint8)
    out.append(("checkerboard", _png(Image.fromarray(checker))))
    stripes = ((np.sin(xx * 40) > 0) * 255).astype(np.uint8)
    out.append(("stripes", _png(Image.fromarray(stripes))))
    font = ImageFont.load_default()
    words = [
        "patient",
        "request",
        "form",
        "radiology",
        "department",
        "referral",
        "chest",
        "examination",
        "clinical",
        "history",
        "cough",
        "fever",
        "three",
        "days",
        "please",
        "assess",
    ]
    for i in range(3):
        page = Image.new("L", (600, 800), 255)
        draw = ImageDraw.Draw(page)
        for row in range(40):
            line = " ".join(rng.choice(words, 8))
            draw.text((30, 20 + row * 19), line, fill=0, font=font)
        out.append((f"text page {i}", _png(page)))
        out.append((f"text page {i} negative", _png(Image.eval(page, lambda v: 255 - v))))
    for i in range(4):
        picture = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(12):
            box = sorted(rng.integers(0, 640, 2)), sorted(rng.integers(0, 480, 2))
            draw.ellipse(
                [box[0][0], box[1][0], box[0][1], box[1][1]],
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            )
        out.append((f"colour shapes {i}", _jpeg(picture)))
        out.append((f"grey shapes {i}", _jpeg(picture.convert("L"))))
    # A CT-like phantom: bright ellipse ring with darker inner ellipses, on black.
    phantom = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(phantom)
    draw.ellipse([60, 30, 452, 482], fill=230)
    draw.ellipse([80, 50, 432, 462], fill=90)
    draw.ellipse([150, 150, 240, 360], fill=20)
    draw.ellipse([272, 150, 362, 360], fill=20)
    draw.ellipse([236, 400, 276, 440], fill=200)
    out.append(("ct-like phantom", _png(phantom)))
    wide = Image.fromarray((np.tile(np.linspace(0, 255, 1600), (400, 1))).astype(np.uint8))
    out.append(("wide 4:1 gradient", _png(wide)))
    return out


def sources(args: argparse.Namespace) -> Iterator[Source]:
    xrays: list[tuple[str, bytes]] = []
    if args.run and args.data:
        validation = validation_split(args.run, args.data)
        xrays += validation
        yield Source("X-rays: validation split of the run", "accepted", validation)
    shared = args.shared_data
    for name, folder in (
        ("X-rays: official val", shared / "chest_xray" / "val"),
        ("X-rays: full-resolution originals", shared / "chest_xray_fullres"),
        ("X-rays: test fixtures", FIXTURES),
    ):
        items = _files(folder)
        if items:
            xrays += items
            yield Source(name, "accepted", items)
    few = [item for item in xrays if "fullres" in item[0] or "/val/" in item[0]]
    yield Source("X-rays rotated 90/180/270", "refused", rotated(few[: args.rotated]))
    yield Source("not X-rays: images in Python packages", "refused", package_images())
    yield Source("not X-rays: /usr/share images", "refused", system_images(args.system_limit))
    yield Source("not X-rays: generated", "refused", generated_images())


# --- running ----------------------------------------------------------------------------


def evaluate(runner: ModelRunner, source: Source) -> Tally:
    meta = runner.require_ready()
    limits = runner.settings.decode_limits()
    tally = Tally()
    pending: list[tuple[str, Prepared]] = []

    def outcome(name: str, code: str | None) -> None:
        tally.n += 1
        if code is None:
            tally.accepted += 1
        else:
            tally.codes[code] += 1
        if (code is None) != (source.want == "accepted"):
            tally.wrong.append(f"{name}: {code or 'accepted'}")

    def flush() -> None:
        if not pending:
            return
        outputs = runner.predict_outputs([p.model_input for _, p in pending])
        for (name, prepared), row in zip(pending, outputs, strict=True):
            judged = judge(meta, runner.gate, row, prepared, explain=False)
            outcome(name, judged.refusal.code if judged.refusal else None)
        pending.clear()

    for name, data in source.items:
        try:
            pending.append((name, prepare(data, meta, limits, runner.gate, explain=False)))
        except GateRefusal as exc:
            outcome(name, exc.code)
        except (ImageError, ApiError) as exc:
            outcome(name, f"decode:{exc.code}")
        if len(pending) >= BATCH:
            flush()
    flush()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "default")
    parser.add_argument("--run", type=Path, help="run folder: adds its validation split")
    parser.add_argument("--data", type=Path, help="the data folder the run was trained on")
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=DEFAULT_SHARED_DATA,
        help="the shared data folder (official val, full-resolution)",
    )
    parser.add_argument("--rotated", type=int, default=64, help="X-rays to rotate (x3)")
    parser.add_argument(
        "--system-limit", type=int, default=300, help="most /usr/share images (evenly thinned)"
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--show-wrong", type=int, default=10)
    args = parser.parse_args(argv)

    runner = ModelRunner(Settings(model_dir=args.model_dir, providers="cpu"))
    runner.load()
    if not runner.ready:
        raise SystemExit(f"the bundle did not load: {runner.error}")
    if runner.gate is None:
        raise SystemExit(f"{args.model_dir} has no gate (format 1 bundle)")
    meta = runner.require_ready()
    print(
        f"bundle {args.model_dir} ({meta.name} {meta.version}), gate threshold "
        f"{runner.gate.info.threshold:.2f}, rotated threshold "
        f"{runner.gate.info.rotated_threshold:.2f}\n"
    )
    print("| images | should be | n | accepted | refused | refusal codes |")
    print("|---|---|---|---|---|---|")
    results = {}
    for source in sources(args):
        if not source.items:
            continue
        tally = evaluate(runner, source)
        refused = tally.n - tally.accepted
        share = (tally.accepted if source.want == "accepted" else refused) / max(1, tally.n)
        codes = ", ".join(f"{c} {k}" for c, k in tally.codes.most_common())
        print(
            f"| {source.name} | {source.want} | {tally.n} | {tally.accepted} | "
            f"{refused} ({share:.1%} as wanted) | {codes} |"
        )
        results[source.name] = {
            "want": source.want,
            "n": tally.n,
            "accepted": tally.accepted,
            "codes": dict(tally.codes),
            "wrong": tally.wrong,
        }
    for name, result in results.items():
        for line in result["wrong"][: args.show_wrong]:
            print(f"  not as wanted ({name}): {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
