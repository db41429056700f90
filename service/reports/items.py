"""What a report is made of: one entry per screened file, in request order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.errors import ApiError
from service.inference import Scored

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class ReportItem:
    """A screened file: its result, or the error that kept it from the model. `header` is
    the DICOM input's header (no pixel data); None for JPEG and PNG."""

    result: Scored | None = None
    error: ApiError | None = None
    header: Dataset | None = None
    filename: str | None = None
