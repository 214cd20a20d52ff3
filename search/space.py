"""The search space: one registry entry per searched parameter, and the ranges they draw from.

``PARAMS`` is the one definition of each searched parameter: its name (a ``TrainConfig`` field,
so a sampled point plus the fixed settings is a ``TrainConfig``), the ``SearchSpace`` field that
holds its choices or range, its kind, and the loss types it is sampled for. Sampling
(``suggest``), the seed recipe's point (``seed_point``), the trials table's parameter columns and
``applicable_params`` all derive from it. ``SearchSpace``'s fields carry their CLI flag and help
text, so ``search.run``'s flags derive from it too.

==================  ============================================  =========================
parameter           range (default)                               sampled when
==================  ============================================  =========================
``resize_px``       ``resize_choices`` (256, 384, 512)             always
``loss_type``       ``loss_types`` (dice, dice_bce, dice_focal)    always
``dice_weight``     ``weight_range`` (0.25-2.0)                    dice_bce, dice_focal
``bce_weight``      ``weight_range``                               dice_bce
``focal_weight``    ``weight_range``                               dice_focal
``focal_gamma``     ``focal_gamma_range`` (1-3)                    dice_focal
``lr``              ``lr_range`` (1e-5-3e-3), log                  always
``warmup_epochs``   ``warmup_epochs_range`` (0-5), integer         always
``weight_decay``    ``weight_decay_range`` (1e-5-0.1), log         always
``arch``            ``archs`` (Unet)                               more than one given
``encoder``         ``encoders`` (resnet18)                        more than one given
``batch_size``      ``batch_sizes`` (16)                           more than one given
``aug_strength``    ``aug_strengths`` (1.0)                        more than one given
==================  ============================================  =========================

The last four are *optional dimensions*: with one choice (their default) they are not searched
but fixed (``fixed_params``: they join the base config of every trial), so a sweep that does not
ask for them samples, records (``trials.csv``) and ranks (importances) exactly what it did before
they existed. ``--batch-sizes`` leaves the learning rate to the search: ``lr`` is sampled jointly
with the batch size (no scaling rule), and TPE learns which pairs work.

The seed recipe is the first point evaluated, so a sweep can only improve on it. Ranges are
overridden by flags or a JSON/YAML file whose keys are the ``SearchSpace`` field names; an unknown
name is an error. ``fit_to_budget`` narrows the warmup range so that every trial's warmup ends
by the time ASHA first judges it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.config import LOSS_TYPES, SEED_RECIPE, TrainConfig
from tumorseg.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One searched parameter."""

    name: str  # the TrainConfig field it sets (also its Optuna name and trials.csv column)
    range_field: str  # the SearchSpace field holding its choices (categorical) or LOW,HIGH
    kind: str  # "categorical" | "float" | "int"
    log: bool = False
    loss_types: tuple[str, ...] | None = None  # sampled only for these loss types (None: always)
    optional: bool = False  # searched only when its choices hold more than one value (else fixed)

    def searched(self, space: "SearchSpace") -> bool:
        """Whether ``space`` searches this parameter (an optional one with one choice is fixed)."""
        return not self.optional or len(getattr(space, self.range_field)) > 1

    def applies(self, params: dict[str, Any]) -> bool:
        """Whether this parameter is sampled given the (earlier) parameters of the same point."""
        return self.loss_types is None or params.get("loss_type") in self.loss_types


# In sampling order: a parameter's condition may only name parameters above it.
PARAMS = (
    Param("resize_px", "resize_choices", "categorical"),
    Param("loss_type", "loss_types", "categorical"),
    Param("dice_weight", "weight_range", "float", loss_types=("dice_bce", "dice_focal")),
    Param("bce_weight", "weight_range", "float", loss_types=("dice_bce",)),
    Param("focal_weight", "weight_range", "float", loss_types=("dice_focal",)),
    Param("focal_gamma", "focal_gamma_range", "float", loss_types=("dice_focal",)),
    Param("lr", "lr_range", "float", log=True),
    Param("warmup_epochs", "warmup_epochs_range", "int"),
    Param("weight_decay", "weight_decay_range", "float", log=True),
    Param("arch", "archs", "categorical", optional=True),
    Param("encoder", "encoders", "categorical", optional=True),
    Param("batch_size", "batch_sizes", "categorical", optional=True),
    Param("aug_strength", "aug_strengths", "categorical", optional=True),
)
PARAM_NAMES = tuple(p.name for p in PARAMS)
OPTIONAL_NAMES = tuple(p.name for p in PARAMS if p.optional)
OPTIONAL_RANGE_FIELDS = tuple(p.range_field for p in PARAMS if p.optional)
# Which conditional parameters each loss type samples (derived; for tables and docs).
LOSS_PARAMS = {t: tuple(p.name for p in PARAMS if p.loss_types and t in p.loss_types) for t in LOSS_TYPES}
_CONFIG_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
assert set(PARAM_NAMES) <= set(_CONFIG_TYPES), "every searched parameter is a TrainConfig field"


def _range(default: tuple, flag: str, help: str, integer: bool = False):
    return field(default=default, metadata={"flag": flag, "help": help, "kind": "int_range" if integer else "range"})


@dataclass
class SearchSpace:
    """The choices and ranges the parameters draw from (field metadata: CLI flag and help)."""

    resize_choices: list[int] = field(
        default_factory=lambda: [256, 384, 512],
        metadata={"flag": "--resize-choices", "help": "training sizes in px, e.g. 96,128", "kind": "int_list"},
    )
    loss_types: list[str] = field(
        default_factory=lambda: list(LOSS_TYPES),
        metadata={"flag": "--loss-types", "help": f"subset of {','.join(LOSS_TYPES)}", "kind": "str_list"},
    )
    weight_range: tuple[float, float] = _range((0.25, 2.0), "--weight-range", "loss term weights LOW,HIGH")
    focal_gamma_range: tuple[float, float] = _range((1.0, 3.0), "--focal-gamma-range", "focal loss gamma LOW,HIGH")
    lr_range: tuple[float, float] = _range((1e-5, 3e-3), "--lr-range", "learning rate LOW,HIGH (log scale)")
    warmup_epochs_range: tuple[int, int] = _range((0, 5), "--warmup-epochs-range", "warmup epochs LOW,HIGH", integer=True)
    weight_decay_range: tuple[float, float] = _range((1e-5, 1e-1), "--weight-decay-range", "AdamW weight decay LOW,HIGH (log scale)")
    # optional dimensions: one choice = fixed (not searched); the seed recipe's values by default
    archs: list[str] = field(
        default_factory=lambda: [SEED_RECIPE.arch],
        metadata={"flag": "--archs", "help": "smp architectures, e.g. Unet,FPN,DeepLabV3Plus", "kind": "str_list"},
    )
    encoders: list[str] = field(
        default_factory=lambda: [SEED_RECIPE.encoder],
        metadata={"flag": "--encoders", "help": "smp encoders, e.g. resnet18,resnet34,efficientnet-b0", "kind": "str_list"},
    )
    batch_sizes: list[int] = field(
        default_factory=lambda: [SEED_RECIPE.batch_size],
        metadata={"flag": "--batch-sizes", "help": "training batch sizes, e.g. 8,16,32 (lr stays searched: no scaling rule)",
                  "kind": "int_list"},
    )
    aug_strengths: list[float] = field(
        default_factory=lambda: [SEED_RECIPE.aug_strength],
        metadata={"flag": "--aug-strengths", "help": "augmentation strengths, e.g. 0,0.5,1,2 (0 = flips only)",
                  "kind": "float_list"},
    )

    def __post_init__(self) -> None:
        self.resize_choices = [int(v) for v in self.resize_choices]
        self.loss_types = list(self.loss_types)
        self.archs, self.encoders = [str(v) for v in self.archs], [str(v) for v in self.encoders]
        self.batch_sizes = [int(v) for v in self.batch_sizes]
        self.aug_strengths = [float(v) for v in self.aug_strengths]
        for name in _range_fields():
            setattr(self, name, tuple(getattr(self, name)))
        if len(self.warmup_epochs_range) == 2:
            self.warmup_epochs_range = tuple(int(v) for v in self.warmup_epochs_range)
        self.validate()

    def validate(self) -> None:
        if not self.resize_choices:
            raise ConfigError("resize_choices: give at least one size")
        for size in self.resize_choices:
            if size <= 0:  # multiples of each encoder's stride: search.cli checks (needs smp)
                raise ConfigError(f"resize_choices: {size} is not a positive size")
        for name in OPTIONAL_RANGE_FIELDS:
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"{name}: give one or more distinct values, got {values or 'none'}")
        if min(self.batch_sizes) <= 0:
            raise ConfigError(f"batch_sizes: values must be > 0, got {min(self.batch_sizes)}")
        if min(self.aug_strengths) < 0:
            raise ConfigError(f"aug_strengths: values must be >= 0, got {min(self.aug_strengths)}")
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ConfigError(f"loss_types: {unknown or 'empty'}; choose from {', '.join(LOSS_TYPES)}")
        for name in _range_fields():
            value = getattr(self, name)
            if len(value) != 2:
                raise ConfigError(f"{name}: expected LOW,HIGH, got {value}")
            low, high = value
            if low > high:
                raise ConfigError(f"{name}: low {low} > high {high}")
            if low < 0:
                raise ConfigError(f"{name}: values must be >= 0, got {low}")
        for p in PARAMS:
            if p.log and getattr(self, p.range_field)[0] <= 0:
                raise ConfigError(f"{p.range_field}: a log-uniform range needs low > 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "search space") -> "SearchSpace":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown search-space name(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> "SearchSpace":
        return cls.from_dict(read_space_file(path), source=str(path))

    def replace(self, **changes: Any) -> "SearchSpace":
        return SearchSpace.from_dict({**self.to_dict(), **changes})

    def fixed_params(self) -> dict[str, Any]:
        """The optional parameters this space does not search, at their one value (for the base config)."""
        return {p.name: getattr(self, p.range_field)[0] for p in PARAMS if not p.searched(self)}

    def searched_params(self) -> list[Param]:
        return [p for p in PARAMS if p.searched(self)]


def _range_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(SearchSpace) if f.metadata.get("kind") in ("range", "int_range")]


def read_space_file(path: Path) -> dict[str, Any]:
    """``--space FILE``: a JSON or YAML mapping of ``SearchSpace`` field names to values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError:
        raise ConfigError(f"--space: cannot read {path}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the file's fault
        raise ConfigError(f"--space: {path} is not valid {path.suffix.lstrip('.') or 'JSON'} ({err})".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError(f"--space: {path} must hold a mapping of names to values")
    return values


# ----------------------------------------------------------------------------- sampling


def distribution(param: Param, space: SearchSpace):
    """The Optuna distribution of ``param`` in ``space``."""
    import optuna.distributions as od

    values = getattr(space, param.range_field)
    if param.kind == "categorical":
        return od.CategoricalDistribution(values)
    if param.kind == "int":
        return od.IntDistribution(*values, log=param.log)
    return od.FloatDistribution(*values, log=param.log)


def all_distributions(space: SearchSpace) -> dict:
    """Every searched parameter's Optuna distribution, in sampling order."""
    return {p.name: distribution(p, space) for p in space.searched_params()}


def distributions(space: SearchSpace, params: dict[str, Any]) -> dict:
    """Optuna distributions of the parameters present in ``params`` (to rebuild a study)."""
    return {p.name: distribution(p, space) for p in PARAMS if p.name in params}


def _suggest_from(trial, name: str, dist):
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, od.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def suggest(space: SearchSpace, trial) -> None:
    """Sample one point of ``space`` on an Optuna trial, conditional parameters included."""
    params: dict[str, Any] = {}
    for p in space.searched_params():
        if p.applies(params):
            params[p.name] = _suggest_from(trial, p.name, distribution(p, space))


def define_by_run(space: SearchSpace):
    """The define-by-run function for ``OptunaSearch(space=...)`` (picklable: Tune saves it)."""
    return functools.partial(suggest, space)


def applicable_params(values: dict[str, Any]) -> dict[str, Any]:
    """The parameters a point actually sampled (conditional ones of other loss types and missing
    values dropped), typed like their ``TrainConfig`` fields (a CSV gives ``resize_px`` 128.0)."""
    params: dict[str, Any] = {}
    for p in PARAMS:
        value = values.get(p.name)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not p.applies(params):
            continue
        value = value.item() if hasattr(value, "item") else value
        params[p.name] = int(value) if _CONFIG_TYPES[p.name] in ("int", int) else value
    return params


# ----------------------------------------------------------------------------- the seed recipe


def nearest_resize(space: SearchSpace, wanted: int = SEED_RECIPE.resize_px) -> int:
    return min(space.resize_choices, key=lambda size: (abs(size - wanted), size))


def _fit(param: Param, value, space: SearchSpace, notes: list[str]):
    """``value`` moved into ``param``'s allowed values, with a note when it had to move."""
    allowed = getattr(space, param.range_field)
    if param.kind == "categorical":
        if value in allowed:
            return value
        numeric = all(isinstance(v, (int, float)) for v in [value, *allowed])
        fitted = min(allowed, key=lambda v: (abs(v - value), v)) if numeric else allowed[0]
        notes.append(f"seed recipe {param.name} {value} is not among {allowed}: using {fitted}")
        return fitted
    low, high = allowed
    if low <= value <= high:
        return value
    fitted = min(max(value, low), high)
    notes.append(f"seed recipe {param.name} {value} is outside {low}-{high}: using {fitted}")
    return fitted


def seed_point(space: SearchSpace) -> tuple[dict[str, Any], list[str]]:
    """The seed recipe as a point of ``space`` and notes on what had to change to fit it.

    Values outside the space are moved to the nearest allowed value (e.g. resize 256 when the
    choices are 96,128 becomes 128), and the notes say so.
    """
    notes: list[str] = []
    point: dict[str, Any] = {}
    for p in space.searched_params():
        if p.applies(point):
            point[p.name] = _fit(p, getattr(SEED_RECIPE, p.name), space, notes)
    return point, notes


# ----------------------------------------------------------------------------- the budget


def fit_to_budget(space: SearchSpace, epochs: int, grace_period: int | None, explicit: bool) -> tuple[SearchSpace, list[str]]:
    """Narrow ``warmup_epochs_range`` so that every trial's warmup ends within its budget.

    A trial must reach its sampled learning rate before its last epoch (``warmup < epochs``) and,
    under ASHA, by the time it is first judged (``warmup <= grace_period``); otherwise ASHA
    compares trials that are still warming up. A default range is narrowed with a note; a range the user
    gave (``explicit``) that breaks the first rule is an error, the second a warning note.
    """
    low, high = space.warmup_epochs_range
    limit = epochs - 1 if grace_period is None else min(epochs - 1, grace_period)
    limit = max(limit, 0)
    if high <= limit:
        return space, []
    if explicit:
        if high >= epochs:
            raise ConfigError(f"--warmup-epochs-range {low},{high}: a warmup of {high} epochs never ends within "
                              f"--epochs {epochs}; use a HIGH below {epochs}")
        return space, [f"warning: warmups of up to {high} epochs are still running when ASHA first judges trials "
                       f"(--grace-period {grace_period}); such trials may be stopped before they reach their lr"]
    fitted = space.replace(warmup_epochs_range=(min(low, limit), limit))
    why = f"within --epochs {epochs}" if grace_period is None or epochs - 1 <= grace_period else f"by the ASHA --grace-period {grace_period}"
    return fitted, [f"warmup_epochs range {low}-{high} narrowed to {min(low, limit)}-{limit} so every warmup ends {why}"]
