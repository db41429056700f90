"""A site's labelled X-rays, in the folder layouts training.data already reads.

    <site>/NORMAL/*  <site>/PNEUMONIA/*                 the site's own folder
    <site>/<split>/NORMAL/*  <site>/<split>/PNEUMONIA/*  a data set in the standard layout
                                                        (split: test by default)

Files ending .jpeg, .jpg, .png or .dcm are read (whatever their content turns out to
be, the decoder checks it); patients are told apart by training.data.patient_id (the
Kermany naming; any other name makes each file its own patient).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.data import BINARY_LABELS, NEGATIVE_LABEL, POSITIVE_LABEL, Sample, list_split

AUTO = "auto"
DEFAULT_SPLIT = "test"


class SiteDataError(ValueError):
    """The site folder is not in a layout calibration reads, or lacks a class."""


@dataclass(frozen=True)
class SiteData:
    root: Path
    folder: str  # where the images were found, relative to the site: "." or "test"
    samples: list[Sample]

    def patients(self, label: str) -> int:
        return len({s.patient for s in self.samples if s.label == label})

    def images(self, label: str) -> int:
        return sum(1 for s in self.samples if s.label == label)


def _has_classes(folder: Path) -> bool:
    return any((folder / label).is_dir() for label in BINARY_LABELS)


def find_site_data(root: Path, split: str = AUTO) -> SiteData:
    """The site's images: <root>/{NORMAL,PNEUMONIA} when present, else
    <root>/test/{NORMAL,PNEUMONIA}; `split` names the sub-folder explicitly."""
    if not root.is_dir():
        raise SiteDataError(f"site data folder {root} does not exist")
    if split == AUTO:
        if _has_classes(root):
            split = "."
        elif _has_classes(root / DEFAULT_SPLIT):
            split = DEFAULT_SPLIT
        else:
            raise SiteDataError(
                f"no {NEGATIVE_LABEL}/ or {POSITIVE_LABEL}/ folder in {root} nor in "
                f"{root / DEFAULT_SPLIT}; put the site's X-rays in <site>/{NEGATIVE_LABEL} and "
                f"<site>/{POSITIVE_LABEL} (or name the sub-folder with --split)"
            )
    elif not _has_classes(root / split):
        raise SiteDataError(f"no {NEGATIVE_LABEL}/ or {POSITIVE_LABEL}/ folder in {root / split}")
    samples = list_split(root, "" if split == "." else split, n_labels=2)
    site = SiteData(root, split, samples)
    missing = [label for label in BINARY_LABELS if site.images(label) == 0]
    if missing:
        where = root if split == "." else root / split
        raise SiteDataError(
            f"no images in {', '.join(str(where / label) for label in missing)}: "
            "calibration needs X-rays of both classes"
        )
    return site
