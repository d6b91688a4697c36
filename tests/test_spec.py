"""Spec validation: every mistake is one line naming the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

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
    root = Path(__file__).resolve().parents[1]
    # The paper's recipes: what a preset fills in, what the file itself overrides.
    (tmp_path / "cifar-100-python").mkdir()
    import torch

    from sdd_search.models import create_model

    ckpt = tmp_path / "t.pth"  # the check opens it: a real resnet32x4 for 100 classes
    torch.save(create_model("resnet32x4", num_classes=100).state_dict(), ckpt)
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
    assert spec.train.lr == 0.01  # the authors' lr for a ShuffleNet student
    assert spec.search.epochs == 60 and spec.search.grace_period <= 60
    assert (spec.final.top_k, spec.final.seeds) == (3, 3)
    assert imagenet.student.model == "torchvision/mobilenet_v2" and imagenet.final is not None
    assert imagenet.search.epochs == 30 and imagenet.search_trial.train.milestones == [9, 18, 27]
    # The paper's two ImageNet pairs, at its recipe and its SD-DKD points.
    r18 = load_spec(root / "search_spaces" / "imagenet_r34_r18.yaml", [f"data.root={tmp_path}"])
    assert (r18.teacher.model, r18.teacher.weights) == ("torchvision/resnet34", "IMAGENET1K_V1")
    assert r18.student.model == "torchvision/resnet18" and r18.distill.scales == [1, 2]
    assert (r18.distill.base, r18.distill.dkd_beta, r18.distill.temperature) == ("dkd", 0.5, 1.0)
    mbv1 = load_spec(root / "search_spaces" / "imagenet_r50_mbv1.yaml", [f"data.root={tmp_path}"])
    assert mbv1.teacher.model == "torchvision/resnet50" and mbv1.student.model == "mobilenetv1"
    assert mbv1.distill.scales == [1, 2, 4] and mbv1.distill.base == "dkd"
    for paper_pair in (r18, mbv1):
        assert paper_pair.train.milestones == [30, 60, 90] and paper_pair.train.epochs == 100
        assert paper_pair.train.batch_size * paper_pair.resources.workers == 256
        assert paper_pair.final is not None and paper_pair.search.epochs == 30
    quick = load_spec(root / "search_spaces" / "quickstart.yaml")
    assert quick.final is not None and quick.search.epochs < quick.train.epochs
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


READY_SPECS = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", READY_SPECS, ids=[p.name for p in READY_SPECS])
def test_every_ready_spec_passes_check(path, tmp_path, capsys):
    """`sdd-search SPEC --check` for each ready spec, its data and teacher faked where absent
    here (a CIFAR folder, an image folder of a few files, a checkpoint file); final on in all."""
    raw = yaml.safe_load(path.read_text())
    overrides = []
    dataset = raw.get("data", {}).get("dataset", "digits")
    if dataset in ("cifar100", "cifar10"):
        (tmp_path / f"{dataset.replace('cifar', 'cifar-')}-python").mkdir()
        overrides.append(f"data.root={tmp_path}")
    elif dataset == "imagefolder":
        for split, count in (("train", 10), ("val", 2)):
            folder = tmp_path / split / "n01"
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.jpg").write_bytes(b"\xff\xd8")
        overrides.append(f"data.root={tmp_path}")
    if raw.get("teacher", {}).get("source") == "checkpoint":  # opened by the check: a real one
        import torch

        from sdd_search.models import create_model

        classes = {"cifar100": 100}.get(dataset, 10)
        model = create_model(raw["teacher"]["model"], num_classes=classes)
        torch.save(model.state_dict(), tmp_path / "t.pth")
        overrides.append(f"teacher.checkpoint={tmp_path / 't.pth'}")
    assert main([str(path), "--check", *(f for o in overrides for f in ("--set", o))]) == 0
    out = capsys.readouterr().out
    assert "final       top " in out and "\ncost        search " in out
    assert "could not be listed" not in out and out.rstrip().endswith("spec OK")
