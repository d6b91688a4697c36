"""Files that try to run code: CIFAR batches and teacher checkpoints whose pickles ask to run a
function are refused by ``--check``, in one line naming the file, and never run; torn files and
a teacher for another number of classes are one-line errors too. Real files, the real CLI."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sdd_search.cli import main
from sdd_search.data import DatasetError, build_datasets_and_loaders, safe_pickle
from sdd_search.models import create_model


class _RunsShell:
    """Unpickling this runs ``touch MARKER`` (pickle stores it as ``posix.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensFile:
    """Unpickling this creates MARKER (pickle stores it as ``io.open``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


HOSTILE = [(_RunsShell, "posix.system"), (_OpensFile, "io.open")]


def _cifar_entry(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "filenames": [f"{i}.png" for i in range(count)],
        "fine_labels": rng.integers(0, 100, count).tolist(),
        "coarse_labels": rng.integers(0, 20, count).tolist(),
        "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
    }


@pytest.fixture
def cifar_spec(tmp_path, write_spec):
    """A CIFAR-100 spec (50 train / 20 test images on disk, a resnet8 checkpoint teacher that
    fits it, a final stage: both batches are read); returns (spec path, batch folder, teacher)."""
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", 50), ("test", 20)):
        with open(folder / name, "wb") as handle:
            pickle.dump(_cifar_entry(count, seed=count), handle, protocol=2)
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": create_model("resnet8", num_classes=100).state_dict()}, teacher)
    spec = write_spec(
        {
            "data": {"dataset": "cifar100", "root": str(tmp_path / "data"), "image_size": 8},
            "teacher": {"source": "checkpoint", "checkpoint": str(teacher), "train": None},
            "final": {"top_k": 1, "seeds": 1},
        }
    )
    return spec, folder, teacher


def _check_fails(capsys, spec: Path, *expected: str) -> str:
    """``sdd-search SPEC --check``: exit 2, one stderr line naming the spec and ``expected``."""
    assert main([str(spec), "--check"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sdd-search: error: {spec}: "), err
    assert "Traceback" not in err and "spec OK" not in captured.out
    for text in expected:
        assert text in err, err
    return err


def test_good_files_pass_the_check(capsys, cifar_spec):
    spec, _, _ = cifar_spec
    assert main([str(spec), "--check"]) == 0
    assert "spec OK" in capsys.readouterr().out


@pytest.mark.parametrize(("payload", "asked"), HOSTILE, ids=[h[1] for h in HOSTILE])
@pytest.mark.parametrize("batch", ["train", "test"])
def test_a_cifar_batch_that_runs_code_is_refused_never_run(
    capsys, tmp_path, cifar_spec, payload, asked, batch
):
    spec, folder, _ = cifar_spec
    marker = tmp_path / "MARKER"
    entry = _cifar_entry(50, seed=0)
    entry["filenames"][0] = payload(marker)  # hidden deep inside an otherwise real batch
    with open(folder / batch, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)
    err = _check_fails(
        capsys, spec, f"data.root: {folder / batch}: ", f"it asks to run {asked}", "refusing"
    )
    assert not marker.exists(), err
    # What a trial's worker reads goes through the same unpickler: refused there too, not run.
    with pytest.raises(DatasetError, match="not a plain-data CIFAR batch"):
        build_datasets_and_loaders(
            "cifar100", root=str(folder.parent), batch_size=8, device=torch.device("cpu"),
            stage="search" if batch == "train" else "final",
        )  # fmt: skip
    assert not marker.exists()


def test_a_torn_or_foreign_cifar_batch_is_one_line(capsys, cifar_spec):
    spec, folder, _ = cifar_spec
    whole = (folder / "train").read_bytes()
    (folder / "train").write_bytes(whole[: len(whole) // 2])
    _check_fails(capsys, spec, f"{folder / 'train'}: truncated or corrupt file")
    with open(folder / "train", "wb") as handle:  # plain data, but not a batch
        pickle.dump({"pixels": [1, 2, 3]}, handle, protocol=2)
    _check_fails(capsys, spec, f"{folder / 'train'}: not a CIFAR batch")


def test_the_test_batch_is_only_read_with_a_final_stage(capsys, tmp_path, cifar_spec, write_spec):
    spec, folder, teacher = cifar_spec
    marker = tmp_path / "MARKER"
    (folder / "test").write_bytes(pickle.dumps(_RunsShell(marker), protocol=2))
    _check_fails(capsys, spec, f"{folder / 'test'}: ")
    no_final = write_spec(
        {
            "data": {"dataset": "cifar100", "root": str(folder.parent), "image_size": 8},
            "teacher": {"source": "checkpoint", "checkpoint": str(teacher), "train": None},
        },
        name="no-final.yaml",
    )
    assert main([str(no_final), "--check"]) == 0  # the search stage never opens it
    assert not marker.exists()


@pytest.mark.parametrize(("payload", "asked"), HOSTILE, ids=[h[1] for h in HOSTILE])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_teacher_that_runs_code_is_refused_never_run(
    capsys, tmp_path, cifar_spec, payload, asked, writer
):
    spec, _, teacher = cifar_spec
    marker = tmp_path / "MARKER"
    state_dict = create_model("resnet8", num_classes=100).state_dict()
    checkpoint = {"model": state_dict, "epoch": 240, "extra": payload(marker)}
    if writer == "torch.save":
        torch.save(checkpoint, teacher)
    else:
        teacher.write_bytes(pickle.dumps({"epoch": 240, "extra": payload(marker)}))
    err = _check_fails(
        capsys,
        spec,
        f"teacher.checkpoint: {teacher}: not a weights-only PyTorch checkpoint "
        f"(it asks to run {asked}); refusing to load it",
    )
    assert not marker.exists(), err
    assert "Weights only load failed" not in err


def test_a_torn_teacher_is_one_line(capsys, cifar_spec):
    spec, _, teacher = cifar_spec
    whole = teacher.read_bytes()
    teacher.write_bytes(whole[: len(whole) // 2])
    _check_fails(capsys, spec, f"teacher.checkpoint: {teacher}: truncated or corrupt file")
    teacher.write_bytes(b"")
    _check_fails(capsys, spec, f"teacher.checkpoint: {teacher}: empty file")


def test_a_teacher_for_another_dataset_or_model_is_one_line(capsys, cifar_spec):
    spec, _, teacher = cifar_spec
    torch.save(create_model("resnet8", num_classes=10).state_dict(), teacher)
    _check_fails(
        capsys,
        spec,
        f"teacher.checkpoint: {teacher} predicts 10 classes but the dataset has 100",
    )
    torch.save(create_model("resnet20", num_classes=100).state_dict(), teacher)
    _check_fails(
        capsys, spec, f"teacher.checkpoint: {teacher} does not fit model 'resnet8' (unexpected keys"
    )
    torch.save({"model": {"fc.weight": "not a tensor"}}, teacher)
    _check_fails(capsys, spec, f"teacher.checkpoint: {teacher} holds no state_dict of tensors")


def test_a_hostile_teacher_stops_a_run_before_anything_starts(capsys, tmp_path, cifar_spec):
    """Without --check too: refused by the spec check, before the plan (run_search's first
    line) is printed, so before Ray."""
    spec, _, teacher = cifar_spec
    marker = tmp_path / "MARKER"
    torch.save({"model": _RunsShell(marker)}, teacher)
    assert main([str(spec)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "refusing to load it" in captured.err and not marker.exists()


@pytest.mark.parametrize("protocol", range(6))
def test_the_restricted_unpickler_reads_plain_data_and_numpy_only(tmp_path, protocol):
    entry = {
        "data": np.arange(24, dtype=np.uint8).reshape(2, 12),
        "labels": [1, 2],
        "names": ["a", b"b"],
        "numpy_scalar": np.int64(3),
        "sets": ({1, 2}, frozenset({3}), bytearray(b"xy")),
        "floats": np.linspace(0, 1, 5, dtype=np.float32),
    }
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(entry, protocol=protocol)))
    np.testing.assert_array_equal(loaded["data"], entry["data"])
    np.testing.assert_array_equal(loaded["floats"], entry["floats"])
    assert loaded["labels"] == [1, 2] and loaded["names"] == ["a", b"b"]
    assert loaded["numpy_scalar"] == 3 and loaded["sets"] == entry["sets"]
    marker = tmp_path / "MARKER"
    hostile = pickle.dumps({"data": [_OpensFile(marker)]}, protocol=protocol)
    with pytest.raises(safe_pickle.PickleRefused, match=r"it asks to run io\.open"):
        safe_pickle.load(io.BytesIO(hostile))
    assert safe_pickle.first_foreign_global(hostile) == "io.open" and not marker.exists()
    # An object array smuggles nothing either: its items go through the same allowlist.
    objects = np.array([_OpensFile(marker)], dtype=object)
    with pytest.raises(safe_pickle.PickleRefused):
        safe_pickle.load(io.BytesIO(pickle.dumps(objects, protocol=protocol)))
    assert not marker.exists()
