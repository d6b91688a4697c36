"""The resolved plan ``--check`` prints (and a search logs first): what will run, on how many
images, at what cost.

:func:`resolved_plan` is the text; :func:`plan_cost` the arithmetic behind its ``cost`` line.
Cheap and offline: the data roles come from :func:`sdd_search.data.dataset_info` (no image is
decoded; CIFAR's standard counts are not even read from disk), and torch is imported only when a
plan is made, so ``sdd_search.cli`` imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdd_search.space import PAPER, REFERENCE_NAMES
from sdd_search.spec import Spec

if TYPE_CHECKING:
    from sdd_search.data import DatasetInfo

# Training images per second per GPU, by image size, for the GPU-hour estimate of the cost line.
# Reference figures measured on an H200 with the SDD authors' code (issue 14, benchmarks/README.md),
# not with ours: to be replaced by our own benchmarks/run_gpu.sh figures once measured.
THROUGHPUT_IMG_PER_S: dict[int, tuple[float, str]] = {
    32: (5500.0, "H200, SDD authors' code, resnet32x4->resnet8x4 fp32 batch 64"),
    224: (3600.0, "H200, SDD authors' code, resnet34->resnet18 fp32 batch 256"),
}

# The final stage's references: the label-only baseline, plain KD and the spec's own SDD point.
FINAL_REFERENCES = (*REFERENCE_NAMES, PAPER)
_PAD = " " * 12  # continuation lines line up under the values


@dataclass(frozen=True)
class Cost:
    """The training a spec asks for. Epochs are upper bounds for the search (ASHA stops some
    trials early); images are training images (each epoch's evaluation is not counted)."""

    search_runs: int  # references + searched trials
    search_references: int
    search_epochs: int  # per search run (the search schedule)
    final_runs: int  # (finalists + references) x seeds; 0 = no final stage
    final_epochs: int  # per final run (the full recipe, train.epochs)
    search_images_per_epoch: int | None  # train minus selection; None = data not listed
    final_images_per_epoch: int | None  # train + selection
    image_size: int | None = None  # pixels; None = unknown (data not listed, no size given)
    img_per_s: float | None = None  # per GPU; None = no estimate (a CPU spec or no figure)
    throughput_source: str = ""

    @property
    def search_total_epochs(self) -> int:
        return self.search_runs * self.search_epochs

    @property
    def final_total_epochs(self) -> int:
        return self.final_runs * self.final_epochs

    @property
    def total_epochs(self) -> int:
        return self.search_total_epochs + self.final_total_epochs

    @property
    def images(self) -> int | None:
        if self.search_images_per_epoch is None or self.final_images_per_epoch is None:
            return None
        return (
            self.search_total_epochs * self.search_images_per_epoch
            + self.final_total_epochs * self.final_images_per_epoch
        )

    @property
    def gpu_hours(self) -> float | None:
        """images / img/s per GPU / 3600. A trial on G GPUs runs G times faster on G GPUs, so
        its GPU-hours are the same as on one: they do not depend on resources."""
        if self.img_per_s is None or self.images is None:
            return None
        return self.images / self.img_per_s / 3600


def final_runs(spec: Spec) -> int:
    """(configurations) x seeds of the final stage: at most ``final.top_k`` finalists (no more
    than the search's trials) plus the three references; 0 when the stage is off."""
    if spec.final is None:
        return 0
    configurations = min(spec.final.top_k, spec.search.num_trials)
    configurations += len(FINAL_REFERENCES) if spec.final.references else 0
    return configurations * spec.final.seeds


def image_size(spec: Spec, info: DatasetInfo | None) -> int | None:
    if spec.data.image_size is not None:
        return spec.data.image_size
    return None if info is None else info.image_size


def plan_cost(spec: Spec, info: DatasetInfo | None) -> Cost:
    """The cost of ``spec`` given its search-stage data roles ``info`` (None: not listed)."""
    references = len(REFERENCE_NAMES) if spec.search.references else 0
    size = image_size(spec, info)
    gpus = spec.resources.gpus_per_worker > 0
    figure = THROUGHPUT_IMG_PER_S.get(size or 0) if gpus else None
    return Cost(
        search_runs=references + spec.search.num_trials,
        search_references=references,
        search_epochs=spec.search_trial.train.epochs,
        final_runs=final_runs(spec),
        final_epochs=spec.train.epochs,
        search_images_per_epoch=None if info is None else info.num_train,
        final_images_per_epoch=None if info is None else info.num_train + info.num_selection,
        image_size=size,
        img_per_s=None if figure is None else figure[0],
        throughput_source="" if figure is None else figure[1],
    )


def _count(n: float) -> str:
    """1,150 / 91.8M / 1.73B."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def _hours(hours: float) -> str:
    if hours < 0.05:
        return "<0.1"
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.1f}"


def describe_data(spec: Spec) -> tuple[DatasetInfo | None, str]:
    """(the search stage's data roles or None, the ``data`` line); never raises for data that
    cannot be listed here (a remote root, a folder the spec check let through): the line says so."""
    data = spec.data
    where = f" at {data.root}" if data.root else ""
    head = f"data        {data.dataset}{where}"
    if data.root and "://" in data.root:
        return None, f"{head}: remote, not listed here (image counts unknown)"
    from sdd_search.data import DatasetError, dataset_info, role_counts

    try:
        info = dataset_info(
            data.dataset,
            data.root,
            data.image_size,
            stage="search",
            selection_fraction=data.selection_fraction,
            synthetic_num_classes=data.synthetic_num_classes,
            synthetic_size=data.synthetic_size,
        )
    except (DatasetError, OSError, ValueError) as error:
        return None, f"{head}: could not be listed here ({error}); image counts unknown"
    note = "; the standard split's counts" if data.dataset in ("cifar10", "cifar100") else ""
    line = (
        f"{head} ({info.image_size} px, {info.num_classes} classes): {role_counts(info)}{note}"
        f"\n{_PAD}search trains on train, scores on selection; final trains on train + "
        "selection, scores on test once"
    )
    return info, line


def _schedule(train) -> str:
    if train.schedule == "multistep":
        return "milestones " + "/".join(str(m) for m in train.resolved_milestones())
    return train.schedule


def describe_search(spec: Spec) -> str:
    search, searched = spec.search, spec.search_trial.train
    references = f" + {len(REFERENCE_NAMES)} references" if search.references else ""
    scheduler = (
        f"ASHA (grace {search.grace_period}, reduction {search.reduction_factor:g})"
        if search.scheduler == "asha"
        else "no early stopping"
    )
    if search.epochs is None or search.epochs == spec.train.epochs:
        fidelity = f"the full {spec.train.epochs}-epoch recipe ({_schedule(spec.train)})"
    else:
        fidelity = (
            f"{searched.epochs}-epoch search schedule ({_schedule(searched)}) of the "
            f"{spec.train.epochs}-epoch recipe"
        )
        if spec.distill.warmup_epochs:
            warmup = spec.search_trial.distill.warmup_epochs
            fidelity += f", kd warm-up {spec.distill.warmup_epochs} -> {warmup} epochs"
    return (
        f"search      {spec.name}: {search.num_trials} trials{references}, "
        f"{search.max_concurrent} at once, {search.sampler.upper()} sampler (seed {search.seed}), "
        f"{scheduler}, {search.mode} {search.metric} on the selection split\n"
        f"{_PAD}{fidelity}"
    )


def describe_distill(spec: Spec) -> str:
    distill = spec.distill
    extra = {
        "dkd": f" alpha={distill.dkd_alpha} beta={distill.dkd_beta}",
        "nkd": f" gamma={distill.nkd_gamma}",
    }.get(distill.base, "")
    warmup = f" warm-up={distill.warmup_epochs}" if distill.warmup_epochs else ""
    return (
        f"distill     {distill.method} base={distill.base} scales={distill.scales} "
        f"T={distill.temperature}{extra} complementary={distill.complementary_weight} "
        f"ce={distill.ce_weight} kd={distill.kd_weight}{warmup}"
    )


def describe_final(spec: Spec) -> str:
    final = spec.final
    if final is None:
        return "final       off (the search's leaderboard is the answer; one seed each)"
    finalists = min(final.top_k, spec.search.num_trials)
    references = " + 3 references (baseline, kd, the spec's own SDD point)"
    seeds = ", ".join(str(spec.train.seed + i) for i in range(final.seeds))
    concurrent = final.max_concurrent or spec.search.max_concurrent
    return (
        f"final       top {finalists}{references if final.references else ''} x "
        f"{final.seeds} seeds ({seeds}) = {final_runs(spec)} runs at the full "
        f"{spec.train.epochs}-epoch recipe ({_schedule(spec.train)}), {concurrent} at once"
    )


def describe_cost(spec: Spec, cost: Cost) -> str:
    search = (
        f"search {cost.search_total_epochs:,} epochs ({cost.search_runs} runs x "
        f"{cost.search_epochs}"
        + ("; an upper bound, ASHA stops some early" if spec.search.scheduler == "asha" else "")
        + ")"
    )
    if cost.final_runs:
        final = f"final {cost.final_total_epochs:,} epochs ({cost.final_runs} runs x {cost.final_epochs})"
        line = f"cost        {search} + {final} = {cost.total_epochs:,} epochs"
    else:
        line = f"cost        {search}, no final stage"
    images = cost.images
    line += f", {_count(images)} training images" if images is not None else " (images unknown)"
    if spec.teacher.source == "train":
        epochs = (spec.teacher.train or spec.train).epochs
        line += f"\n{_PAD}+ the teacher, trained once ({epochs} epochs) unless cached"
    if spec.resources.gpus_per_worker <= 0:
        return line
    hours = cost.gpu_hours
    if hours is None:
        why = (
            "the image count is unknown"
            if images is None
            else f"no figure for {cost.image_size} px"
        )
        return f"{line}\n{_PAD}no GPU-hour estimate: {why} (plan.THROUGHPUT_IMG_PER_S)"
    return (
        f"{line}\n{_PAD}estimate ~{_hours(hours)} GPU-hours at {cost.img_per_s:,.0f} img/s per GPU "
        f"({cost.throughput_source}; an estimate, not measured for this spec; GPU-hours do not "
        "depend on GPUs per trial)"
    )


def resolved_plan(spec: Spec) -> str:
    """A human-readable summary printed by ``--check`` and at the start of a search."""
    info, data_line = describe_data(spec)
    teacher = spec.teacher
    train, resources = spec.train, spec.resources
    lines = [
        describe_search(spec),
        data_line,
        f"teacher     {teacher.model} ({teacher.source}"
        + (f": {teacher.checkpoint}" if teacher.checkpoint else "")
        + (f": {teacher.weights}" if teacher.source == "torchvision" else "")
        + ")",
        f"student     {spec.student.model}",
        describe_distill(spec),
        f"train       {train.epochs} epochs, batch {train.batch_size}, lr {train.lr}, "
        f"wd {train.weight_decay}, {train.schedule}",
        f"resources   {resources.workers} worker(s) x ({resources.cpus_per_worker} CPU, "
        f"{resources.gpus_per_worker} GPU) per trial",
        "space:",
    ]
    for knob, space in spec.space.items():
        if space.choices is not None:
            lines.append(f"  {knob:<22} choice {space.choices}")
        else:
            kind = "log-" if space.log else ""
            lines.append(f"  {knob:<22} {kind}{space.type} [{space.low}, {space.high}]")
    if not spec.space:
        lines.append("  (empty: every trial uses the spec's own values)")
    lines += [
        describe_final(spec),
        describe_cost(spec, plan_cost(spec, info)),
        f"tracking    {spec.tracking.uri} experiment {spec.experiment_name!r}, "
        f"top {spec.search.top_k} registered as {spec.registered_model_name!r}",
        f"storage     {spec.experiment_path()}",
    ]
    return "\n".join(lines)
