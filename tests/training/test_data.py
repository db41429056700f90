"""Patient ids, labels, the patient-level split and the array cache."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    Sample,
    acquisition_key,
    class_weights,
    list_split,
    load_arrays,
    patient_id,
    split_by_acquisition,
    split_by_fold,
    split_by_patient,
    split_for_validation,
    subtype_label,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "chest_xray"
SHARED_MANIFEST = (
    Path(__file__).parents[2].parent / "shared" / "data" / "chest_xray" / "manifest.csv"
)


@pytest.mark.parametrize(
    ("filename", "patient"),
    [
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person1946_bacteria_4875.jpeg", "person1946"),
        ("person1_virus_6.jpeg", "person1"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0041-0001.jpeg", "NORMAL2-IM-0041"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("scan_from_another_site.png", "scan_from_another_site"),  # unknown scheme: own patient
    ],
)
def test_patient_id(filename: str, patient: str) -> None:
    assert patient_id(filename) == patient


def test_normal2_and_im_prefixes_are_different_patients() -> None:
    assert patient_id("NORMAL2-IM-0041-0001.jpeg") != patient_id("IM-0041-0001.jpeg")


def test_subtype_label() -> None:
    assert subtype_label("person1_virus_6.jpeg", "PNEUMONIA") == "VIRAL"
    assert subtype_label("person10_bacteria_43.jpeg", "PNEUMONIA") == "BACTERIAL"
    assert subtype_label("IM-0115-0001.jpeg", "NORMAL") == "NORMAL"
    with pytest.raises(ValueError, match="bacteria"):
        subtype_label("IM-0115-0001.jpeg", "PNEUMONIA")


def test_list_split_reads_the_standard_layout() -> None:
    samples = list_split(FIXTURES, "train")
    assert len(samples) == 32
    assert {s.label for s in samples} == {"NORMAL", "PNEUMONIA"}
    three = list_split(FIXTURES, "train", n_labels=3)
    assert {s.label for s in three} == {"NORMAL", "BACTERIAL", "VIRAL"}
    assert list_split(FIXTURES, "test") == []  # an absent split is simply empty


def _synthetic(n_patients: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = "PNEUMONIA" if rng.random() < 0.74 else "NORMAL"
        for k in range(int(rng.integers(1, 6))):
            samples.append(Sample(Path(f"p{p}_{k}.jpeg"), label, f"patient{p}"))
    return samples


def test_split_keeps_each_patient_on_one_side_and_is_stratified() -> None:
    samples = _synthetic(600)
    train, val = split_by_patient(samples, val_fraction=0.15, seed=7)
    assert len(train) + len(val) == len(samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert 0.10 < len(val) / len(samples) < 0.20

    def share(xs: list[Sample]) -> float:
        return sum(s.label == "PNEUMONIA" for s in xs) / len(xs)

    assert abs(share(val) - share(samples)) < 0.05


def test_split_is_seeded() -> None:
    samples = _synthetic(300)
    first = split_by_patient(samples, 0.2, seed=1)[1]
    assert first == split_by_patient(samples, 0.2, seed=1)[1]
    assert first != split_by_patient(samples, 0.2, seed=2)[1]


def readme_id(filename: str) -> str:
    """The data set README's patient id of a file name."""
    if filename.startswith("person"):
        return filename.split("_")[0]
    return re.sub(r"-\d+\.jpe?g$", "", filename)


@pytest.mark.skipif(
    not SHARED_MANIFEST.is_file(), reason="../shared/data is not beside this checkout"
)
def test_split_of_the_real_training_set_has_no_shared_patient() -> None:
    with SHARED_MANIFEST.open() as manifest:
        rows = [r for r in csv.DictReader(manifest) if r["split"] == "train"]
    samples = [Sample(Path(r["filename"]), r["label"], patient_id(r["filename"])) for r in rows]
    # The data set README counts 2913 patients by dropping only the last "-NNNN" group
    # (IM-0429-0001-0002 -> IM-0429-0001). Our ids are coarser (-> IM-0429): they never split
    # one of its patients across two ids, so they can only merge, never leak.
    readme_ids = {readme_id(r["filename"]) for r in rows}
    assert len(readme_ids) == 2913
    ours_of_readme = {}
    for r in rows:
        name = r["filename"]
        readme = readme_id(name)
        ours_of_readme.setdefault(readme, set()).add(patient_id(name))
    assert all(len(ours) == 1 for ours in ours_of_readme.values())
    assert len({s.patient for s in samples}) == 2846
    train, val = split_by_patient(samples, 0.15, seed=42)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert 600 < len(val) < 950


def test_class_weights_balance_the_classes() -> None:
    samples = [
        Sample(Path(f"{i}.jpeg"), "PNEUMONIA" if i < 75 else "NORMAL", str(i)) for i in range(100)
    ]
    weights = class_weights(samples, ("NORMAL", "PNEUMONIA"))
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)
    assert weights[0] == pytest.approx(2.0)


def test_load_arrays_uses_the_service_preprocessing_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.preprocessing import load_model_input

    samples = list_split(FIXTURES, "val")
    x, y = load_arrays(samples, ("NORMAL", "PNEUMONIA"), (96, 96), tmp_path)
    assert x.shape == (4, 96, 96, 3) and x.dtype == np.uint8
    assert list(y) == [0 if s.label == "NORMAL" else 1 for s in samples]
    np.testing.assert_array_equal(x[0], load_model_input(samples[0].path.read_bytes(), 96, 96))
    assert len(list(tmp_path.glob("inputs-*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds these images")

    monkeypatch.setattr("training.data.load_model_input", no_decoding)
    again, _ = load_arrays(samples, ("NORMAL", "PNEUMONIA"), (96, 96), tmp_path)
    np.testing.assert_array_equal(x, again)
    with pytest.raises(AssertionError, match="decoded again"):  # another size: a new entry
        load_arrays(samples, ("NORMAL", "PNEUMONIA"), (64, 64), tmp_path)


def test_a_second_writer_of_the_same_cache_entry_does_not_break_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs started together both miss the cache and both write it: the other one
    finishing its write and rename between our save and our rename must not fail us."""
    samples = list_split(FIXTURES, "val")
    labels = ("NORMAL", "PNEUMONIA")
    real_save = np.save
    pids = iter([1001, 1002])  # this process, then the other writer
    monkeypatch.setattr("training.data.os.getpid", lambda: next(pids))
    other_ran = []

    def save_then_the_other_writer_finishes(path, array):
        real_save(path, array)
        if not other_ran:
            other_ran.append(True)
            load_arrays(samples, labels, (64, 64), tmp_path)  # the whole other write

    monkeypatch.setattr("training.data.np.save", save_then_the_other_writer_finishes)
    x, _ = load_arrays(samples, labels, (64, 64), tmp_path)
    assert other_ran and x.shape == (4, 64, 64, 3)
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    assert len(list(tmp_path.glob("inputs-*.npy"))) == 1


def _series_samples() -> list[Sample]:
    """20 patients in each id series, some with two images."""
    samples = []
    for number in range(1, 21):
        for patient, label in (
            (f"IM-{number:04d}", "NORMAL"),
            (f"NORMAL2-IM-{number:04d}", "NORMAL"),
            (f"person{number}", "PNEUMONIA"),
        ):
            for image in range(1 + number % 2):
                samples.append(Sample(Path(f"{patient}-{image}.jpeg"), label, patient))
    return samples


def test_acquisition_key_reads_series_and_number() -> None:
    assert acquisition_key("NORMAL2-IM-0041") == ("NORMAL2-IM-", 41)
    assert acquisition_key("IM-0117") == ("IM-", 117)
    assert acquisition_key("person1946") == ("person", 1946)
    assert acquisition_key("no_digits_here") == ("no_digits_here", 0)


def test_acquisition_split_holds_out_the_most_recent_ids_of_every_series() -> None:
    samples = _series_samples()
    train, val = split_by_acquisition(samples, 0.2)
    held = {s.patient for s in val}
    # 20% of 20 patients = the 4 highest numbers, in each of the three series.
    assert held == {
        f"{prefix}{n}" for n in (17, 18, 19, 20) for prefix in ("IM-00", "NORMAL2-IM-00", "person")
    }
    assert not held & {s.patient for s in train}
    assert len(train) + len(val) == len(samples)


def test_fold_split_is_by_patient_and_covers_every_patient_once() -> None:
    samples = _series_samples()
    held_out = []
    for fold in range(4):
        train, val = split_by_fold(samples, 4, fold, seed=3)
        assert not {s.patient for s in train} & {s.patient for s in val}
        held_out.extend(s.patient for s in val)
    assert sorted(held_out) == sorted(s.patient for s in samples)
    with pytest.raises(ValueError, match="fold"):
        split_by_fold(samples, 4, 4, seed=3)


def test_split_for_validation_dispatches_and_rejects_unknown_schemes() -> None:
    samples = _series_samples()
    assert split_for_validation(samples, "acquisition", 0.2, 1) == split_by_acquisition(
        samples, 0.2
    )
    assert split_for_validation(samples, "patient", 0.2, 1) == split_by_patient(samples, 0.2, 1)
    with pytest.raises(ValueError, match="unknown validation scheme"):
        split_for_validation(samples, "random-images", 0.2, 1)
