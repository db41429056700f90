"""Finding, labelling, splitting and caching a chest X-ray folder.

The folder is in the standard layout `<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`
(val and test optional). Images become model inputs through `service.preprocessing`, the
same code the service runs on uploads; the arrays are cached so epochs don't re-decode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.preprocessing import load_model_input

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})
BINARY_LABELS = ("NORMAL", "PNEUMONIA")
SUBTYPE_LABELS = ("NORMAL", "BACTERIAL", "VIRAL")
POSITIVE_LABEL = "PNEUMONIA"
NEGATIVE_LABEL = "NORMAL"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pneumoscreen"
DATA_CREDIT = (
    "Kermany, Zhang, Goldbaum. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification. Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0); "
    "Kermany et al., Cell 172(5), 2018."
)

# Patient ids as the data set's README documents them:
#   person1946_bacteria_4874.jpeg -> person1946
#   IM-0117-0001.jpeg, IM-0429-0001-0002.jpeg -> IM-0117, IM-0429
#   NORMAL2-IM-0041-0001.jpeg -> NORMAL2-IM-0041
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),
)


def patient_id(filename: str) -> str:
    """The patient an image belongs to; an unknown naming scheme makes each file its own."""
    name = Path(filename).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(name).stem


def subtype_label(filename: str, folder_label: str) -> str:
    """NORMAL / BACTERIAL / VIRAL, from the folder and the filename's subtype word."""
    if folder_label == NEGATIVE_LABEL:
        return NEGATIVE_LABEL
    name = Path(filename).name.lower()
    if "virus" in name:
        return "VIRAL"
    if "bacteria" in name:
        return "BACTERIAL"
    raise ValueError(f"{filename}: a PNEUMONIA image without 'bacteria' or 'virus' in its name")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str  # one of the run's labels
    patient: str


def labels_for(n_labels: int) -> tuple[str, ...]:
    if n_labels == 2:
        return BINARY_LABELS
    if n_labels == 3:
        return SUBTYPE_LABELS
    raise ValueError("--labels must be 2 (NORMAL/PNEUMONIA) or 3 (NORMAL/BACTERIAL/VIRAL)")


def list_split(root: Path, split: str, n_labels: int = 2) -> list[Sample]:
    """Every image of `<root>/<split>/{NORMAL,PNEUMONIA}`, sorted; [] if the split is absent."""
    samples = []
    for folder_label in BINARY_LABELS:
        folder = root / split / folder_label
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            label = folder_label if n_labels == 2 else subtype_label(path.name, folder_label)
            samples.append(Sample(path, label, patient_id(path.name)))
    return samples


def split_by_patient(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Carve a validation set out of `samples` so no patient is on both sides.

    Stratified by label, grouped by patient, seeded: sklearn's StratifiedGroupKFold with
    k = round(1 / val_fraction), first fold held out.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < val_fraction < 0.5:
        raise ValueError("val_fraction must be in (0, 0.5)")
    n_splits = max(2, round(1.0 / val_fraction))
    labels = [s.label for s in samples]
    groups = [s.patient for s in samples]
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


_SERIES_NUMBER = re.compile(r"^(.*?)(\d+)$")


def acquisition_key(patient: str) -> tuple[str, int]:
    """(id series, sequence number): `NORMAL2-IM-0041` -> ("NORMAL2-IM-", 41)."""
    match = _SERIES_NUMBER.match(patient)
    if match is None:
        return patient, 0
    return match.group(1), int(match.group(2))


def split_by_acquisition(
    samples: list[Sample], val_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """Hold out the most recent acquisitions: per id series, the patients with the highest
    sequence numbers (a contiguous block, `val_fraction` of that series' patients).

    The Kermany ids are given in acquisition order, so this block stands for the patients a
    deployed model meets next; a random patient split mixes them with the training weeks.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError("val_fraction must be in (0, 0.5)")
    by_series: dict[str, set[tuple[int, str]]] = {}
    for sample in samples:
        series, number = acquisition_key(sample.patient)
        by_series.setdefault(series, set()).add((number, sample.patient))
    held_out: set[str] = set()
    for patients in by_series.values():
        ordered = sorted(patients)
        n_held = round(len(ordered) * val_fraction)
        held_out.update(patient for _, patient in ordered[len(ordered) - n_held :])
    train = [s for s in samples if s.patient not in held_out]
    val = [s for s in samples if s.patient in held_out]
    return train, val


def split_by_fold(
    samples: list[Sample], folds: int, fold: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Fold `fold` of a stratified, patient-grouped `folds`-fold split (seeded)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds (got fold {fold} of {folds})")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [s.label for s in samples]
    groups = [s.patient for s in samples]
    for i, (train_idx, val_idx) in enumerate(
        splitter.split(np.zeros(len(samples)), labels, groups)
    ):
        if i == fold:
            return [samples[j] for j in train_idx], [samples[j] for j in val_idx]
    raise AssertionError("unreachable: StratifiedGroupKFold yields `folds` folds")


VALIDATION_SCHEMES = ("patient", "acquisition", "kfold")


def split_for_validation(
    samples: list[Sample],
    scheme: str,
    val_fraction: float,
    seed: int,
    folds: int = 5,
    fold: int = 0,
) -> tuple[list[Sample], list[Sample]]:
    """The (train, validation) split a run is trained and judged on."""
    if scheme == "patient":
        return split_by_patient(samples, val_fraction, seed)
    if scheme == "acquisition":
        return split_by_acquisition(samples, val_fraction)
    if scheme == "kfold":
        return split_by_fold(samples, folds, fold, seed)
    raise ValueError(f"unknown validation scheme {scheme!r}; choose from {VALIDATION_SCHEMES}")


def split_samples(run_dir: Path, data_root: Path, part: str, n_labels: int) -> list[Sample]:
    """The `train` or `validation` side of a run's patient-level split (its split.json)."""
    wanted = json.loads((run_dir / "split.json").read_text())[part]
    by_path = {
        str(s.path.relative_to(data_root)): s for s in list_split(data_root, "train", n_labels)
    }
    missing = [p for p in wanted if p not in by_path]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} {part} images of {run_dir} are not under {data_root}/train "
            f"(e.g. {missing[0]}): use the data folder the run was trained on"
        )
    return [by_path[p] for p in wanted]


def label_counts(samples: list[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in samples).items()))


def class_weights(samples: list[Sample], labels: tuple[str, ...]) -> dict[int, float]:
    """Inverse-frequency weights (n / (k * n_c)), so each class counts equally in the loss."""
    counts = Counter(s.label for s in samples)
    total, k = len(samples), len(labels)
    return {i: total / (k * counts[label]) for i, label in enumerate(labels) if counts[label]}


def load_arrays(
    samples: list[Sample],
    labels: tuple[str, ...],
    size: tuple[int, int],
    cache_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, H, W, 3) uint8 and label indices (N,), cached on disk by content."""
    height, width = size
    y = np.array([labels.index(s.label) for s in samples], dtype=np.int32)
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_dir / f"inputs-{_cache_key(samples, size)}.npy"
        if cache_file.is_file():
            x = np.load(cache_file, mmap_mode="r")
            if x.shape == (len(samples), height, width, 3):
                return np.asarray(x), y
    x = np.empty((len(samples), height, width, 3), dtype=np.uint8)
    for i, sample in enumerate(samples):
        x[i] = load_model_input(sample.path.read_bytes(), height, width)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # One partial file per process: two runs started together both write the cache,
        # and a shared name let one rename the other's file away mid-write.
        partial = cache_file.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, x)
        partial.replace(cache_file)
    return x, y


def _cache_key(samples: list[Sample], size: tuple[int, int]) -> str:
    """Changes with the files, the size, the preprocessing code and the decoders' versions,
    so a cache never serves arrays the current pipeline would not produce."""
    from importlib.metadata import version

    import service.preprocessing

    digest = hashlib.sha256()
    digest.update(Path(service.preprocessing.__file__).read_bytes())
    decoders = {name: version(name) for name in ("pillow", "numpy", "pydicom")}
    digest.update(json.dumps({"size": size, "decoders": decoders}).encode())
    for sample in samples:
        stat = sample.path.stat()
        digest.update(f"{sample.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]
