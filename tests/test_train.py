"""One distillation run, no Ray: the loop, exact resume, teachers and their checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from sdd_search.config import DataConfig, DistillConfig, TeacherConfig, TrainConfig, TrialConfig
from sdd_search.models import create_model
from sdd_search.teacher import (
    TeacherError,
    cached_teacher_path,
    ensure_teacher,
    load_model_file,
    load_teacher,
    save_model_file,
    teacher_for,
)
from sdd_search.train import (
    CHECKPOINT_FILE,
    EPOCH_CALLBACKS,
    TrialCallback,
    load_checkpoint,
    resolve_device,
    run_trial,
)


def tiny_config(tmp_path, **distill) -> TrialConfig:
    return TrialConfig(
        data=DataConfig(dataset="digits", image_size=8),
        teacher=TeacherConfig(
            model="resnet8",
            cache_dir=str(tmp_path / "cache"),
            train=TrainConfig(epochs=2, batch_size=128, lr=0.1, schedule="cosine", num_threads=1),
        ),
        distill=DistillConfig(scales=[1, 2], **distill),
        train=TrainConfig(
            epochs=3, batch_size=128, lr=0.1, schedule="multistep", milestones=[2], num_threads=1
        ),
    )


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    config = tiny_config(tmp)
    path = ensure_teacher(config, log=lambda line: None)
    return config, path


def test_teacher_is_trained_once_and_cached(trained_teacher):
    config, path = trained_teacher
    assert path == cached_teacher_path(config) and path.is_file()
    stamp = path.stat().st_mtime_ns
    lines = []
    assert ensure_teacher(config, log=lines.append) == path
    assert path.stat().st_mtime_ns == stamp and "cached" in lines[0]
    # A different recipe is a different teacher.
    other = config.model_copy(
        update={
            "teacher": config.teacher.model_copy(
                update={"train": config.teacher.train.model_copy(update={"epochs": 3})}
            )
        }
    )
    assert cached_teacher_path(other) != path


def test_baseline_kd_and_sdd_students_train_through_one_loop(trained_teacher):
    config, path = trained_teacher
    teacher = load_teacher(config.teacher, 10, path)
    results = {}
    for name, distill in {
        "baseline": {"method": "none"},
        "kd": {"scales": [1]},
        "sdd": {"scales": [1, 2], "base": "dkd", "warmup_epochs": 2},
    }.items():
        trial = config.model_copy(update={"distill": config.distill.model_copy(update=distill)})
        results[name] = run_trial(trial, teacher=teacher if name != "baseline" else None)
    for name, result in results.items():
        assert len(result.history) == 3
        assert result.history[-1]["val_top1"] > 30.0, (name, result.history)  # chance is 10 %
        assert result.history[-1]["val_top5"] >= result.history[-1]["val_top1"]
    assert results["baseline"].history[-1]["train_kd"] == 0.0
    assert results["sdd"].history[-1]["train_kd"] > 0.0
    # DKD warm-up: the distillation term is ramped in (epoch 1 at half weight).
    assert results["sdd"].history[0]["lr"] == pytest.approx(0.1)
    assert results["sdd"].history[2]["lr"] == pytest.approx(0.01)  # multistep at epoch 2


def test_teacher_for_loads_the_configured_teacher_and_run_trial_needs_one(trained_teacher):
    config, path = trained_teacher
    teacher = teacher_for(config, log=lambda line: None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    expected = load_teacher(config.teacher, 10, path).state_dict()
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    labels_only = config.model_copy(
        update={"distill": config.distill.model_copy(update={"method": "none"})}
    )
    assert teacher_for(labels_only) is None
    with pytest.raises(ValueError, match="needs a teacher"):
        run_trial(config)  # run_trial never loads a teacher itself


def _labels_only(config: TrialConfig, **train) -> TrialConfig:
    return config.model_copy(
        update={
            "distill": config.distill.model_copy(update={"method": "none"}),
            "train": config.train.model_copy(update=train),
        }
    )


def test_lr_warmup_ramps_the_learning_rate_in(tmp_path):
    """lr_warmup_epochs=3: epochs 1-3 train at lr/3, 2lr/3, lr, then the schedule (constant)."""
    from sdd_search.train import _lr_lambda

    config = _labels_only(tiny_config(tmp_path), epochs=4, schedule="constant", lr_warmup_epochs=3)
    factor = _lr_lambda(config.train)
    assert [factor(completed) for completed in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    history = run_trial(config).history
    # The reported lr is read after the epoch's schedule step: the lr the next epoch trains at.
    assert [row["lr"] for row in history] == pytest.approx([0.1 * 2 / 3, 0.1, 0.1, 0.1])


class Recorder(TrialCallback):
    def __init__(self, name: str, calls: list, stop_at: int | None = None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def on_epoch_start(self, config, epoch):
        self.calls.append((self.name, epoch))
        if epoch == self.stop_at:
            raise RuntimeError(f"stopped at epoch {epoch}")


def test_callbacks_run_at_each_epoch_start_and_can_stop_the_trial(tmp_path):
    config = _labels_only(tiny_config(tmp_path), epochs=3)
    calls: list = []
    reported: list = []
    EPOCH_CALLBACKS.append(Recorder("process-wide", calls, stop_at=2))
    try:
        with pytest.raises(RuntimeError, match="stopped at epoch 2"):
            run_trial(
                config,
                callbacks=[Recorder("argument", calls)],
                report=lambda metrics, write: reported.append(metrics["epoch"]),
            )
    finally:
        EPOCH_CALLBACKS.pop()
    # The argument's callbacks first, then the registry's; epoch 2 never trained.
    expected = [("argument", 1), ("process-wide", 1), ("argument", 2), ("process-wide", 2)]
    assert calls == expected
    assert reported == [1]


def test_restart_continues_exactly(trained_teacher, tmp_path):
    config, path = trained_teacher
    teacher = load_teacher(config.teacher, 10, path)
    straight = run_trial(config, teacher=teacher)

    class Stop(Exception):
        pass

    def stop_after_two(metrics, write_checkpoint):
        write_checkpoint(tmp_path / "ckpt")
        if metrics["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_trial(config, teacher=teacher, report=stop_after_two)
    state = load_checkpoint(tmp_path / "ckpt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    resumed = run_trial(config, teacher=teacher, resume_from=tmp_path / "ckpt" / CHECKPOINT_FILE)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_top1"] == straight.history[-1]["val_top1"]
    assert resumed.history[-1]["train_loss"] == pytest.approx(
        straight.history[-1]["train_loss"], rel=1e-6
    )
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_official_checkpoint_format_and_class_mismatch(tmp_path):
    model = create_model("resnet8", num_classes=10)
    official = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, official)  # mdistiller's format
    loaded = load_model_file(official, "resnet8", 10)
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])
    ours = tmp_path / "ours.pt"
    save_model_file(ours, model, "resnet8", 10)
    assert load_model_file(ours, "resnet8", 10) is not None
    with pytest.raises(TeacherError, match="predicts 10 classes but the dataset has 100"):
        load_model_file(ours, "resnet8", 100)
    with pytest.raises(TeacherError, match="does not fit model 'resnet20'"):
        load_model_file(ours, "resnet20", 10)


class Payload:
    def __reduce__(self):  # what a malicious checkpoint would do on unpickling
        return (print, ("unpickled!",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(TeacherError, match="not a weights-only PyTorch checkpoint"):
        load_model_file(path, "resnet8", 10)
    with pytest.raises(TeacherError, match="no file at"):
        load_model_file(tmp_path / "missing.pt", "resnet8", 10)


# ----------------------------------------------------------------------------------------------
# Data-parallel: two ranks over torch.distributed (gloo), as Ray Train's TorchTrainer runs them


def _ddp_rank(rank: int, world_size: int, port: int, config_json: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        config = TrialConfig.model_validate_json(config_json)
        teacher = create_model("resnet8", num_classes=10).eval()  # any fixed teacher will do
        result = run_trial(config, teacher=teacher)
        torch.save(
            {"state": result.model.state_dict(), "history": result.history},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_train_evaluate_and_keep_one_model(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from sdd_search.data import build_datasets_and_loaders
    from sdd_search.train import evaluate

    config = tiny_config(tmp_path)
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"epochs": 2, "batch_size": 64})}
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(
        _ddp_rank,
        args=(2, port, config.model_dump_json(), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # One model: the same parameters and BatchNorm statistics on both ranks after training.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # The ranks split each epoch's data and agree on every all-reduced metric.
    for row0, row1 in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert row0["world_size"] == 2
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
            assert row0[key] == row1[key], key
    # Validation covered the whole split once: the reported top-1 is that model's on all of it.
    model = create_model("resnet8", num_classes=10)
    model.load_state_dict(ranks[0]["state"])
    info, _, val = build_datasets_and_loaders(
        "digits", root=None, batch_size=128, device=torch.device("cpu"), image_size=8
    )
    local = evaluate(model, val, torch.device("cpu"))
    assert local["val_top1"] == pytest.approx(ranks[0]["history"][-1]["val_top1"], abs=1e-9)
    assert info.num_eval == info.num_selection == 288  # the search stage evaluates on selection


def test_fast_path_is_on_by_default_for_cuda_only():
    from sdd_search.train import _flag

    train = TrainConfig()
    assert (train.amp, train.channels_last, train.compile) == ("auto", "auto", "auto")
    for value in (train.amp, train.channels_last, train.compile):
        assert _flag(value, torch.device("cuda")) and not _flag(value, torch.device("cpu"))
    assert train.compile_mode == "default"
    assert TrainConfig(compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ValueError):
        TrainConfig(compile_mode="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_device_choice_without_a_gpu() -> None:
    """A scheduler's GPU never overrides a CPU run; asking for CUDA without one is an error."""
    assigned = torch.device("cuda", 1)
    assert resolve_device(TrainConfig(device="cpu"), assigned) == torch.device("cpu")
    assert resolve_device(TrainConfig(device="auto"), assigned) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="train.device is cuda"):
        resolve_device(TrainConfig(device="cuda"), assigned)
