"""The knob space: which knobs a spec may search, how each travels through Tune and Optuna.

One place for the knob encoding. A Tune trial's config is ``{TRIAL_KEY: the spec's trial (a
JSON dict), ROLE_KEY: "search" | "baseline" | "kd", <knob>: <sampled value>, ...}``;
:func:`config_of` turns it back into the :class:`TrialConfig` the trial trains, and
:func:`trial_display_name` gives the one name Tune, MLflow and the leaderboard show for it.

No Ray, no Optuna import: :class:`SpaceSampler` only calls the ``suggest_*`` methods of the
Optuna trial it is handed, and every Ray process of a trial imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sdd_search.config import TrainConfig, TrialConfig

# Searchable knobs -> the section of TrialConfig that holds them.
SEARCHABLE: dict[str, str] = {
    "scales": "distill",
    "base": "distill",
    "temperature": "distill",
    "complementary_weight": "distill",
    "dkd_alpha": "distill",
    "dkd_beta": "distill",
    "nkd_gamma": "distill",
    "ce_weight": "distill",
    "kd_weight": "distill",
    "warmup_epochs": "distill",
    "lr": "train",
    "weight_decay": "train",
    "momentum": "train",
}
# Knobs that only matter for one base loss: sampled only when that base is chosen.
BASE_SPECIFIC = {"dkd_alpha": "dkd", "dkd_beta": "dkd", "nkd_gamma": "nkd"}

REFERENCE_NAMES = ("baseline", "kd")  # a student on labels only, and plain KD (scales [1])
SEARCH_ROLE = "search"  # the role of a trial the sampler chose (not a reference)
FINAL_ROLE = "final"  # the role of a final-stage run (one configuration, one seed)
PAPER = "paper"  # the final stage's third reference: the spec's own SDD point
ROLE_KEY = "sdd_role"  # Tune config key: SEARCH_ROLE, FINAL_ROLE or one of REFERENCE_NAMES
TRIAL_KEY = "sdd_trial"  # Tune config key: the spec's trial as a JSON dict
# Tune config key of a final-stage run: {"entry": "finalist-1" | "baseline" | "kd" | "paper",
# "role": "finalist" | the reference, "seed": int, "source_trial": the search trial's id or "",
# "selection_score": that trial's search metric, "params": its encoded knobs}
FINAL_KEY = "sdd_final"


def is_integer_knob(knob: str) -> bool:
    """Whether ``knob``'s field in TrialConfig is an int (e.g. warmup_epochs: whole epochs)."""
    section = TrialConfig.model_fields[SEARCHABLE[knob]].annotation
    return section.model_fields[knob].annotation is int


# --------------------------------------------------------------------------------------------
# A trial's configuration from Tune's


def encode_choice(knob: str, value: Any) -> Any:
    """Optuna's categorical choices must be scalars: scale sets travel as "1,2,4"."""
    return ",".join(str(int(m)) for m in value) if knob == "scales" else value


def decode_choice(knob: str, value: Any) -> Any:
    """The inverse of :func:`encode_choice`: "1,2,4" -> [1, 2, 4]; other knobs unchanged."""
    if knob == "scales" and isinstance(value, str):
        return [int(m) for m in value.split(",")]
    return value


def role_of(config: dict) -> str:
    """The role of a Tune trial config: SEARCH_ROLE or a reference's name."""
    return config.get(ROLE_KEY, SEARCH_ROLE)


def trial_display_name(config: dict, trial_id: str) -> str:
    """The one name of a trial in Tune's table and folders, MLflow and the leaderboard:
    ``trial-<id>`` for a searched trial, the reference's name (``baseline``, ``kd``; one of
    each per search) for a reference, ``<entry>-seed<seed>`` for a final-stage run."""
    role = role_of(config)
    if role == FINAL_ROLE:
        entry = config[FINAL_KEY]
        return f"{entry['entry']}-seed{entry['seed']}"
    return f"trial-{trial_id}" if role == SEARCH_ROLE else role


def proxy_train(train: TrainConfig, epochs: int | None) -> TrainConfig:
    """``train`` shortened to ``epochs`` (None: unchanged), its milestones and lr warm-up
    scaled by the same factor: a whole short schedule, decays included."""
    if epochs is None or epochs == train.epochs:
        return train
    factor = epochs / train.epochs
    milestones = sorted(
        {min(epochs, max(1, round(m * factor))) for m in train.resolved_milestones()}
    )
    return train.model_copy(
        update={
            "epochs": epochs,
            "milestones": milestones,
            "lr_warmup_epochs": round(train.lr_warmup_epochs * factor),
        }
    )


def proxy_trial(trial: TrialConfig, epochs: int | None) -> TrialConfig:
    """The search's fidelity: :func:`proxy_train` and the kd warm-up scaled alike."""
    if epochs is None or epochs == trial.train.epochs:
        return trial
    warmup = round(trial.distill.warmup_epochs * epochs / trial.train.epochs)
    return trial.model_copy(
        update={
            "train": proxy_train(trial.train, epochs),
            "distill": trial.distill.model_copy(update={"warmup_epochs": warmup}),
        }
    )


def full_recipe_params(params: dict[str, Any], search_epochs: int, full_epochs: int) -> dict:
    """Knobs sampled at the search's fidelity, as the full recipe uses them: a searched kd
    warm-up (in epochs) scales back up; every other knob is unchanged."""
    if "warmup_epochs" not in params or search_epochs == full_epochs:
        return dict(params)
    scaled = round(int(params["warmup_epochs"]) * full_epochs / search_epochs)
    return {**params, "warmup_epochs": scaled}


def trial_config(base: dict, params: dict[str, Any]) -> TrialConfig:
    """The spec's trial (``base``, a JSON dict) with the sampled knobs ``params`` applied."""
    tree = {
        section: dict(values) if isinstance(values, dict) else values
        for section, values in base.items()
    }
    for knob, value in params.items():
        if knob in SEARCHABLE:
            tree[SEARCHABLE[knob]][knob] = decode_choice(knob, value)
    return TrialConfig.model_validate(tree)


def reference_config(base: dict, name: str) -> TrialConfig:
    """The reference ``name`` (one of REFERENCE_NAMES) trained from the spec's trial ``base``."""
    tree = {section: dict(values) for section, values in base.items()}
    if name == "baseline":
        tree["distill"]["method"] = "none"
    else:  # plain KD on global logits, the paper's comparison point
        tree["distill"].update(method="sdd", base="kd", scales=[1], complementary_weight=1.0)
    return TrialConfig.model_validate(tree)


def searched_params(config: dict) -> dict[str, Any]:
    """The knobs a Tune trial config holds (a final-stage run: its search trial's), decoded
    (scale sets as lists)."""
    knobs = config[FINAL_KEY]["params"] if role_of(config) == FINAL_ROLE else config
    return {k: decode_choice(k, v) for k, v in knobs.items() if k in SEARCHABLE}


def config_of(config: dict) -> TrialConfig:
    """The TrialConfig of a Tune trial config (a searched trial, a reference or a final run)."""
    role = role_of(config)
    if role == SEARCH_ROLE:
        return trial_config(config[TRIAL_KEY], searched_params(config))
    if role != FINAL_ROLE:
        return reference_config(config[TRIAL_KEY], role)
    entry = config[FINAL_KEY]
    if entry["role"] in REFERENCE_NAMES:
        trial = reference_config(config[TRIAL_KEY], entry["role"])
    else:  # a finalist's knobs, or (PAPER) the spec's own point
        trial = trial_config(config[TRIAL_KEY], searched_params(config))
    return trial.model_copy(
        update={"train": trial.train.model_copy(update={"seed": entry["seed"]})}
    )


def final_entries(finalists: list[dict[str, Any]], references: bool, seeds: list[int]) -> list:
    """The final stage's runs: every (configuration, seed), as FINAL_KEY values.

    ``finalists``: the search's best rows, best first, each ``{"trial", "selection_score",
    "params"}`` (params encoded, at the full recipe); ``references``: add the baseline, plain
    KD and the spec's own SDD point; ``seeds``: the seeds every configuration runs with.
    """
    configurations = [
        (f"finalist-{rank}", "finalist", row["trial"], row["selection_score"], row["params"])
        for rank, row in enumerate(finalists, start=1)
    ]
    if references:
        configurations += [(name, name, "", None, {}) for name in (*REFERENCE_NAMES, PAPER)]
    return [
        {
            "entry": entry,
            "role": role,
            "seed": seed,
            "source_trial": source,
            "selection_score": score,
            "params": params,
        }
        for entry, role, source, score, params in configurations
        for seed in seeds
    ]


# --------------------------------------------------------------------------------------------
# The Optuna define-by-run space


class SpaceSampler:
    """Optuna define-by-run space: base-specific knobs are only sampled for their base.

    ``space``: knob -> a ParamSpace as a dict (``low``/``high``/``log``/``step``/``type`` or
    ``choices``); ``defaults``: the spec's own value of every searched knob (encoded), and
    ``"base"``. A plain class (not a closure) because Tune pickles the searcher into its
    experiment state.
    """

    def __init__(self, space: dict[str, dict], defaults: dict[str, Any]):
        self.space = space
        self.defaults = defaults

    def __call__(self, trial) -> dict[str, Any]:
        """Sample ``trial`` (an optuna.Trial); returns the unsampled knobs with their defaults."""
        base = self.defaults.get("base")
        unsampled = {}
        ordered = sorted(self.space, key=lambda k: k != "base")  # base first: others depend on it
        for knob in ordered:
            space = self.space[knob]
            if knob in BASE_SPECIFIC and BASE_SPECIFIC[knob] != base:
                unsampled[knob] = self.defaults[knob]  # unused by this base; kept for the record
                continue
            value = _suggest(trial, knob, space)
            if knob == "base":
                base = value
        return unsampled


def _suggest(trial, knob: str, space: dict) -> Any:
    if space.get("choices") is not None:
        return trial.suggest_categorical(knob, [encode_choice(knob, c) for c in space["choices"]])
    if space.get("type") == "int":
        return trial.suggest_int(
            knob,
            int(space["low"]),
            int(space["high"]),
            step=int(space.get("step") or 1),
            log=space["log"],
        )
    return trial.suggest_float(
        knob,
        space["low"],
        space["high"],
        log=space["log"],
        step=None if space["log"] else space.get("step"),
    )


def baseline_point(trial: TrialConfig, knobs: Iterable[str]) -> dict[str, Any]:
    """The spec's own values (from ``trial``) of the searched ``knobs``, encoded: evaluated
    first when the spec asks for it, and the sampler's defaults."""
    return {
        knob: encode_choice(knob, getattr(getattr(trial, SEARCHABLE[knob]), knob)) for knob in knobs
    }


def knobs_text(params: dict[str, Any]) -> str:
    """The knobs a trial used, as every table shows them: ``scales=[1, 2], temperature=4``
    in the knob table's order (one order, from Tune or MLflow); a knob of another base loss
    than the trial's (dkd_beta on a kd trial) is left out; "(spec values)" when none was
    searched."""
    base = params.get("base")
    shown = [
        f"{k}={_short(params[k])}"
        for k in sorted(params, key=_knob_order)
        if k not in BASE_SPECIFIC or not base or BASE_SPECIFIC[k] == base
    ]
    return ", ".join(shown) or "(spec values)"


def _knob_order(knob: str) -> int:
    return list(SEARCHABLE).index(knob) if knob in SEARCHABLE else len(SEARCHABLE)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
