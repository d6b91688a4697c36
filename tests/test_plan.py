"""The resolved plan ``--check`` prints: data roles, search schedule, final stage and cost.

Fast: no Ray, no training; the data roles are counted without decoding an image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdd_search.cli import main
from sdd_search.config import PRESETS
from sdd_search.plan import THROUGHPUT_IMG_PER_S, describe_data, plan_cost, resolved_plan
from sdd_search.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
CIFAR100 = ROOT / "search_spaces" / "cifar100.yaml"


def cifar_overrides(tmp_path: Path) -> list[str]:
    """What cifar100.yaml needs to load here: a data folder and a teacher checkpoint file."""
    (tmp_path / "cifar-100-python").mkdir(exist_ok=True)
    checkpoint = tmp_path / "t.pth"
    if not checkpoint.exists():  # the check opens it: a real resnet32x4 for 100 classes
        import torch

        from sdd_search.models import create_model

        torch.save(create_model("resnet32x4", num_classes=100).state_dict(), checkpoint)
    return [f"data.root={tmp_path}", f"teacher.checkpoint={checkpoint}"]


def test_cifar100_cost_equals_a_direct_computation(tmp_path):
    raw = yaml.safe_load(CIFAR100.read_text())
    spec = load_spec(CIFAR100, cifar_overrides(tmp_path))
    # From the file and the paper's recipe, not from the plan's code.
    full_epochs = PRESETS[raw["preset"]]["train"]["epochs"]
    search_epochs = raw["search"]["epochs"]
    references = 2 if raw["search"].get("references", True) else 0
    search_total = (references + raw["search"]["num_trials"]) * search_epochs
    final_runs = (raw["final"]["top_k"] + 3) * raw["final"]["seeds"]  # + baseline, kd, paper
    final_total = final_runs * full_epochs
    # CIFAR-100's 50,000 training images, 10 % held out as the selection split in the search.
    images = search_total * 45_000 + final_total * 50_000

    info, _ = describe_data(spec)
    cost = plan_cost(spec, info)
    assert (cost.search_total_epochs, cost.final_total_epochs) == (search_total, final_total)
    assert cost.total_epochs == search_total + final_total
    assert cost.images == images
    assert cost.gpu_hours == pytest.approx(images / 5500 / 3600)
    assert THROUGHPUT_IMG_PER_S[32][0] == 5500

    plan = resolved_plan(spec)
    cost_line = next(line for line in plan.splitlines() if line.startswith("cost "))
    assert f"search {search_total:,} epochs" in cost_line
    assert f"final {final_total:,} epochs ({final_runs} runs x {full_epochs})" in cost_line
    assert f"= {search_total + final_total:,} epochs" in cost_line
    assert f"estimate ~{images / 5500 / 3600:,.0f} GPU-hours at 5,500 img/s per GPU" in plan
    assert "an estimate, not measured for this spec" in plan
    assert "train 45000 / selection 5000 / test 10000" in plan
    assert f"{search_epochs}-epoch search schedule (milestones 38/45/52) of the 240-epoch" in plan
    assert "final       top 3 + 3 references" in plan and f"= {final_runs} runs" in plan


def test_gpu_hours_do_not_depend_on_gpus_per_trial(tmp_path):
    one = load_spec(CIFAR100, cifar_overrides(tmp_path))
    packed = load_spec(CIFAR100, [*cifar_overrides(tmp_path), "resources.gpus_per_worker=0.5"])
    wide = load_spec(CIFAR100, [*cifar_overrides(tmp_path), "resources.workers=4"])
    info, _ = describe_data(one)
    hours = {plan_cost(s, info).gpu_hours for s in (one, packed, wide)}
    assert len(hours) == 1
    # Another image size without a throughput figure: epochs, images, no estimate.
    other = load_spec(CIFAR100, [*cifar_overrides(tmp_path), "data.image_size=64"])
    plan = resolved_plan(other)
    assert "no GPU-hour estimate: no figure for 64 px" in plan and "GPU-hours at" not in plan


def test_quickstart_check_prints_roles_final_and_cost():
    out = subprocess.run(
        [sys.executable, "-m", "sdd_search", "--check"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "train 1150 / selection 288 / test 359" in out
    assert "final       top 2 + 3 references" in out and "x 2 seeds (0, 1) = 10 runs" in out
    assert "4-epoch search schedule (cosine) of the 8-epoch recipe" in out
    # 6 trials + 2 references at 4 epochs; 10 final runs at 8 epochs (train + selection).
    assert "= 112 epochs, 151,840 training images" in out
    assert "GPU-hours" not in out  # a CPU spec: epochs only
    assert out.rstrip().endswith("spec OK")


def test_a_spec_without_final_says_final_off(write_spec, capsys):
    assert main([str(write_spec()), "--check"]) == 0
    out = capsys.readouterr().out
    assert "\nfinal       off" in out
    assert "no final stage" in out and "the full 2-epoch recipe (cosine)" in out


def test_data_that_cannot_be_listed_is_said_not_raised(write_spec, tmp_path, capsys):
    # An image folder the spec check lets through but whose selection split would be empty.
    for split in ("train", "val"):
        (tmp_path / "folder" / split / "ant").mkdir(parents=True)
        (tmp_path / "folder" / split / "ant" / "a.jpg").write_bytes(b"\xff\xd8")
    data = {"dataset": "imagefolder", "root": str(tmp_path / "folder"), "image_size": 32}
    path = write_spec({"data": data, "resources": {"gpus_per_worker": 1}})
    assert main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "could not be listed here (imagefolder: the selection split is empty" in out
    assert "(images unknown)" in out and "no GPU-hour estimate: the image count is unknown" in out
    # A remote root is not listed at all.
    remote = load_spec(write_spec({"data": {"dataset": "cifar100", "download": True}}))
    remote = remote.model_copy(
        update={"data": remote.data.model_copy(update={"root": "s3://bucket/cifar"})}
    )
    info, line = describe_data(remote)
    assert info is None and "remote, not listed here" in line


@pytest.mark.parametrize(
    ("updates", "field", "expected"),
    [
        ({"search": {"epochs": 3}}, "search.epochs", "must be <= train.epochs (2)"),
        (
            {
                "train": {"epochs": 4},
                "search": {"epochs": 2, "scheduler": "asha", "grace_period": 3},
            },
            "search.grace_period",
            "must be <= search.epochs (2)",
        ),
        (
            {"search": {"scheduler": "asha", "grace_period": 3}},
            "search.grace_period",
            "must be <= train.epochs (2)",
        ),
    ],
    ids=["epochs-above-train", "grace-above-search-epochs", "grace-above-train-epochs"],
)
def test_search_fidelity_mistakes_are_one_line(write_spec, capsys, updates, field, expected):
    path = write_spec(updates)
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert str(raised.value) == f"{path}: {field}: {expected}"
    assert main([str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sdd-search: error: {path}: {field}: {expected}"
