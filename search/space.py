"""The search space, as an Optuna define-by-run function.

Conditional parameters are sampled only where they apply:

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
==================  ============================================  =========================

Parameter names are ``TrainConfig`` field names, so a sampled point plus the fixed settings is a
``TrainConfig``. The seed recipe is the first point evaluated (``seed_point``), so a sweep can
only improve on it. Ranges are overridden by flags or a JSON/YAML file whose keys are the
``SearchSpace`` field names; an unknown name is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.config import LOSS_TYPES, SEED_RECIPE
from tumorseg.errors import ConfigError

# Which conditional parameters each loss type samples.
LOSS_PARAMS = {
    "dice": (),
    "dice_bce": ("dice_weight", "bce_weight"),
    "dice_focal": ("dice_weight", "focal_weight", "focal_gamma"),
}
PARAM_NAMES = ("resize_px", "loss_type", "dice_weight", "bce_weight", "focal_weight", "focal_gamma", "lr", "warmup_epochs", "weight_decay")


@dataclass
class SearchSpace:
    resize_choices: list[int] = field(default_factory=lambda: [256, 384, 512])
    loss_types: list[str] = field(default_factory=lambda: list(LOSS_TYPES))
    weight_range: tuple[float, float] = (0.25, 2.0)
    focal_gamma_range: tuple[float, float] = (1.0, 3.0)
    lr_range: tuple[float, float] = (1e-5, 3e-3)
    warmup_epochs_range: tuple[int, int] = (0, 5)
    weight_decay_range: tuple[float, float] = (1e-5, 1e-1)

    def __post_init__(self) -> None:
        self.resize_choices = [int(v) for v in self.resize_choices]
        self.loss_types = list(self.loss_types)
        for name in ("weight_range", "focal_gamma_range", "lr_range", "warmup_epochs_range", "weight_decay_range"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if not self.resize_choices:
            raise ConfigError("resize_choices: give at least one size")
        for size in self.resize_choices:
            if size <= 0 or size % 32:
                raise ConfigError(f"resize_choices: {size} is not a positive multiple of 32")
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ConfigError(f"loss_types: {unknown or 'empty'}; choose from {', '.join(LOSS_TYPES)}")
        for name in ("weight_range", "focal_gamma_range", "lr_range", "warmup_epochs_range", "weight_decay_range"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ConfigError(f"{name}: expected LOW,HIGH, got {value}")
            low, high = value
            if low > high:
                raise ConfigError(f"{name}: low {low} > high {high}")
            if low < 0:
                raise ConfigError(f"{name}: values must be >= 0, got {low}")
        for name in ("lr_range", "weight_decay_range"):
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"{name}: a log-uniform range needs low > 0")

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
        return cls.from_dict(values, source=str(path))

    def replace(self, **changes: Any) -> "SearchSpace":
        return SearchSpace.from_dict({**self.to_dict(), **changes})


def all_distributions(space: SearchSpace) -> dict:
    """Every parameter's Optuna distribution, in sampling order: the space's one definition."""
    import optuna.distributions as od

    return {
        "resize_px": od.CategoricalDistribution(space.resize_choices),
        "loss_type": od.CategoricalDistribution(space.loss_types),
        "dice_weight": od.FloatDistribution(*space.weight_range),
        "bce_weight": od.FloatDistribution(*space.weight_range),
        "focal_weight": od.FloatDistribution(*space.weight_range),
        "focal_gamma": od.FloatDistribution(*space.focal_gamma_range),
        "lr": od.FloatDistribution(*space.lr_range, log=True),
        "warmup_epochs": od.IntDistribution(*space.warmup_epochs_range),
        "weight_decay": od.FloatDistribution(*space.weight_decay_range, log=True),
    }


def _suggest_from(trial, name: str, dist):
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, od.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def suggest(space: SearchSpace, trial) -> None:
    """Sample one point of ``space`` on an Optuna trial, conditional parameters included."""
    dists = all_distributions(space)
    _suggest_from(trial, "resize_px", dists["resize_px"])
    loss_type = _suggest_from(trial, "loss_type", dists["loss_type"])
    for name in (*LOSS_PARAMS[loss_type], "lr", "warmup_epochs", "weight_decay"):
        _suggest_from(trial, name, dists[name])


def define_by_run(space: SearchSpace):
    """The define-by-run function for ``OptunaSearch(space=...)`` (picklable: Tune saves it)."""
    return functools.partial(suggest, space)


def distributions(space: SearchSpace, params: dict[str, Any]) -> dict:
    """Optuna distributions of the parameters present in ``params`` (to rebuild a study)."""
    dists = all_distributions(space)
    return {name: dists[name] for name in params if name in dists}


def nearest_resize(space: SearchSpace, wanted: int = SEED_RECIPE.resize_px) -> int:
    return min(space.resize_choices, key=lambda size: (abs(size - wanted), size))


def seed_point(space: SearchSpace) -> tuple[dict[str, Any], list[str]]:
    """The seed recipe as a point of ``space`` and notes on what had to change to fit it.

    Values outside the space are moved to the nearest allowed value (e.g. resize 256 when the
    choices are 96,128 becomes 128), and the notes say so.
    """
    notes = []
    recipe = SEED_RECIPE
    resize = nearest_resize(space)
    if resize != recipe.resize_px:
        notes.append(f"seed recipe resize {recipe.resize_px} is not among {space.resize_choices}: using {resize}")
    loss_type = recipe.loss_type if recipe.loss_type in space.loss_types else space.loss_types[0]
    if loss_type != recipe.loss_type:
        notes.append(f"seed recipe loss {recipe.loss_type} is not among {space.loss_types}: using {loss_type}")
    point: dict[str, Any] = {"resize_px": resize, "loss_type": loss_type}

    def clamp(name: str, value, bounds):
        low, high = bounds
        if low <= value <= high:
            return value
        fitted = min(max(value, low), high)
        notes.append(f"seed recipe {name} {value} is outside {low}-{high}: using {fitted}")
        return fitted

    for name in LOSS_PARAMS[loss_type]:
        bounds = space.focal_gamma_range if name == "focal_gamma" else space.weight_range
        point[name] = clamp(name, getattr(recipe, name), bounds)
    point["lr"] = clamp("lr", recipe.lr, space.lr_range)
    point["warmup_epochs"] = clamp("warmup_epochs", recipe.warmup_epochs, space.warmup_epochs_range)
    point["weight_decay"] = clamp("weight_decay", recipe.weight_decay, space.weight_decay_range)
    return point, notes
