"""Peak memory of one decode, per input kind, in bytes a pixel (tracemalloc).

    python -m bench.decode_memory [--side 2000]

Decodes synthetic images of side x side pixels (a ramp, so windowing has work to do)
with service.preprocessing.decode_grey and reports the peak of what tracemalloc sees
(numpy arrays, pydicom's and zlib's bytes; Pillow's own image buffers are not traced),
and, where the code has it, what the decode reserved from the decode memory budget
(service/decode_cost.py's upper bound). In process, no server; nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import sys
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: the repo (and tests.support)
    sys.path.insert(0, str(REPO_ROOT))

from service import preprocessing
from service.preprocessing import decode_grey
from tests.support.dicom_factory import dicom_bytes


def cases(side: int) -> dict[str, bytes]:
    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 4096).astype(np.uint16)
    png16 = io.BytesIO()
    Image.fromarray(ramp * 16).save(png16, "PNG")
    return {
        "dicom 8-bit": dicom_bytes((ramp % 256).astype(np.uint8)),
        "dicom 16-bit": dicom_bytes(ramp),
        "dicom 16-bit, rescale": dicom_bytes(ramp, rescale=(0.5, -100.0)),
        "dicom 16-bit, window": dicom_bytes(ramp, window=(2000, 3000)),
        "dicom 16-bit, rescale + window": dicom_bytes(
            ramp, window=(900, 1500), rescale=(0.5, -100.0)
        ),
        "png 16-bit grey": png16.getvalue(),
    }


def recording_limits() -> tuple[preprocessing.DecodeLimits, list[int] | None]:
    """Limits whose memory budget records each reservation (None: the code under test
    has no budget, e.g. an older checkout)."""
    budget_class = getattr(preprocessing, "DecodeMemoryBudget", None)
    if budget_class is None:
        return preprocessing.DEFAULT_LIMITS, None
    amounts: list[int] = []

    class Recording(budget_class):  # type: ignore[misc, valid-type]
        def acquire(self, nbytes: int, wait_s: float | None = None) -> int:
            amounts.append(super().acquire(nbytes, wait_s))
            return amounts[-1]

    return preprocessing.DecodeLimits(memory=Recording(1 << 34, 0)), amounts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=2000)
    args = parser.parse_args(argv)
    pixels = args.side * args.side
    print(f"{args.side}x{args.side} px; peak = tracemalloc peak during decode_grey")
    print(f"{'input':32s} {'peak MB':>8s} {'B/px':>6s} {'reserved MB':>12s}")
    for name, data in cases(args.side).items():
        limits, amounts = recording_limits()
        tracemalloc.start()
        try:
            decode_grey(data, limits=limits)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        reserved = f"{max(amounts) / 1e6:12.1f}" if amounts else ""
        print(f"{name:32s} {peak / 1e6:8.1f} {peak / pixels:6.1f} {reserved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
