"""Spec validation: every mistake is one line naming the file, the field and what was expected."""

from __future__ import annotations

import pytest
import yaml

from sdd_search.cli import main
from sdd_search.spec import load_spec

BAD_SPECS = [
    ({"search": {"num_trials": 0}}, "search.num_trials", "greater than or equal to 1"),
    ({"search": {"num_trials": "many"}}, "search.num_trials", "integer"),
    ({"serach": {"num_trials": 3}}, "serach", "unknown field"),
    ({"train": {"lr": -1}}, "train.lr", "greater than 0"),
    ({"distill": {"base": "fitnet"}}, "distill.base", "expected 'kd', 'dkd' or 'nkd'"),
    ({"distill": {"scales": [2, 4]}}, "distill.scales", "must start with 1"),
    ({"student": {"model": "resnet33"}}, "student.model", "did you mean"),
    (
        {"teacher": {"model": "torchvision/resnet51", "source": "torchvision"}},
        "teacher.model",
        "did you mean torchvision/resnet50",
    ),
    (
        {"teacher": {"source": "checkpoint", "checkpoint": "/nope/t.pth"}},
        "teacher.checkpoint",
        "no file at /nope/t.pth",
    ),
    (
        {"data": {"dataset": "cifar100", "root": "/nope/cifar"}},
        "data.root",
        "no folder at /nope/cifar",
    ),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "expected 'digits'"),
    (
        {"space": {"temperature": {"low": 8, "high": 1}}},
        "space.temperature",
        "low 8.0 is above high 1.0",
    ),
    ({"space": {"lr": {"low": 0, "high": 1, "log": True}}}, "space.lr", "log range needs low > 0"),
    ({"space": {"lr": {"low": -1.0, "high": 1.0}}}, "space.lr", "-1.0 is not allowed"),
    ({"space": {"dropout": {"low": 0, "high": 1}}}, "space.dropout", "not a searchable knob"),
    ({"space": {"scales": {"choices": [[1], [1, 4, 2]]}}}, "space.scales", "strictly increasing"),
    ({"space": {"base": {"choices": ["kd", "crd"]}}}, "space.base", "'crd'"),
    ({"space": {"kd_weight": {"low": 1}}}, "space.kd_weight", "expected low and high"),
    ({"search": {"metric": "accuracy"}}, "search.metric", "val_top1"),
    ({"train": {"epochs": 10, "milestones": [5, 20]}}, "train.milestones", "<= train.epochs"),
    ({"resources": {"gpus_per_worker": 1.5}}, "resources.gpus_per_worker", "whole number"),
    ({"name": "has spaces"}, "name", "pattern"),
]


@pytest.mark.parametrize(
    ("updates", "field", "expected"), BAD_SPECS, ids=[case[1] for case in BAD_SPECS]
)
def test_bad_spec_is_one_line_naming_file_and_field(write_spec, capsys, updates, field, expected):
    path = write_spec(updates)
    assert main([str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sdd-search: error: {path}: {field}"), err
    assert expected in err, err


def test_yaml_syntax_and_missing_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("search:\n  num_trials: [1, 2\n")
    assert main([str(broken), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sdd-search: error: {broken}: line") and "not valid YAML" in err
    assert main([str(tmp_path / "absent.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_overrides_and_check_print_the_plan(write_spec, capsys):
    path = write_spec()
    assert (
        main(
            [
                str(path),
                "--check",
                "--set",
                "search.num_trials=64",
                "--set",
                "distill.scales=[1, 2, 4]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "64 trials" in out and "scales=[1, 2, 4]" in out and "spec OK" in out
    assert main([str(path), "--check", "--set", "search.num_trials"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_presets_and_ready_specs(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The paper's recipes: what a preset fills in, what the file itself overrides.
    (tmp_path / "cifar-100-python").mkdir()
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"")
    spec = load_spec(
        root / "search_spaces" / "cifar100.yaml",
        [f"data.root={tmp_path}", f"teacher.checkpoint={ckpt}"],
    )
    assert spec.train.epochs == 240 and spec.train.milestones == [150, 180, 210]
    assert spec.train.weight_decay == 5e-4 and spec.distill.ce_weight == 0.1
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    imagenet = load_spec(root / "search_spaces" / "imagenet.yaml", [f"data.root={tmp_path}"])
    assert imagenet.train.milestones == [30, 60, 90] and imagenet.distill.dkd_beta == 0.5
    assert imagenet.resources.workers == 8 and imagenet.train.batch_size * 8 == 256
    quick = load_spec(root / "search_spaces" / "quickstart.yaml")
    assert quick.data.dataset == "digits" and quick.resources.gpus_per_worker == 0
    assert (
        yaml.safe_load((root / "search_spaces" / "quickstart.yaml").read_text())["name"]
        == "quickstart"
    )


def test_unsupported_torchvision_student_fails_the_check_not_the_trial(write_spec, capsys):
    from sdd_search.spec import SpecError

    path = write_spec({"student": {"model": "torchvision/vit_b_16"}})
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path}: student.model: torchvision model 'vit_b_16' is not ")
    assert main([str(path), "--check"]) == 2
    assert "student.model: torchvision model 'vit_b_16' is not supported" in capsys.readouterr().err


def test_checking_a_spec_never_changes_it_and_a_loaded_spec_is_normalised(write_spec):
    from sdd_search.spec import _check_semantics

    space = {"warmup_epochs": {"low": 0, "high": 5}, "temperature": {"low": 1.0, "high": 8.0}}
    path = write_spec({"search": {"num_trials": 1, "max_concurrent": 4}, "space": space})
    spec = load_spec(path)
    # Normalised as it is built: no more trials at once than trials, whole epochs sampled.
    assert spec.search.max_concurrent == 1
    assert spec.space["warmup_epochs"].type == "int"
    assert spec.space["temperature"].type == "float"
    # The checks are pure, even on a spec that was never normalised (model_copy skips the
    # validators): what it says before is what it says after.
    raw = spec.model_copy(
        update={
            "search": spec.search.model_copy(update={"max_concurrent": 4}),
            "space": {
                **spec.space,
                "warmup_epochs": spec.space["warmup_epochs"].model_copy(update={"type": "float"}),
            },
        }
    )
    before = raw.model_dump()
    _check_semantics(raw, str(path))
    assert raw.model_dump() == before
    assert raw.search.max_concurrent == 4 and raw.space["warmup_epochs"].type == "float"
