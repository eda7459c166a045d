"""The typed schema of ``train.py``'s user-facing settings: each key's type and allowed values.

Hydra structured configs: one dataclass per config section, registered in Hydra's ``ConfigStore``
(group ``schema``). :func:`validate_train_config` puts every value of a composed config into its
section's ``OmegaConf.structured`` node -- OmegaConf converts or rejects the type -- and checks it
against the :class:`Allowed` declared on the field. It runs on the composed config before anything
is built, so a bad value gets one line, ``key=value: allowed ...``, and no run starts.

Fields state types and ranges only (``MISSING`` defaults): the defaults still live in ``conf/``.
A field's default can move here later, and its YAML then state only deltas. Keys a section's chosen
option does not have (``distiller.eta`` under SDS) are not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError


class ConfigValueError(ValueError):
    """A config value outside its schema; the message is ``key=value: allowed ...``."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={_show(value)}: allowed {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, DictConfig):  # a schedule: its numbers, not its class
        plain: dict[Any, Any] = OmegaConf.to_container(value, resolve=True)  # type: ignore[assignment]
        value = {k: v for k, v in plain.items() if not str(k).startswith("_")}
    if isinstance(value, str) and (value == "" or value.strip() != value):
        return repr(value)  # an empty or padded string must be visible
    return str(value)


@dataclass(frozen=True)
class Allowed:
    """Allowed values of a setting: a numeric range (bounds inclusive unless ``*_open``), or a
    set of choices; ``nullable``: ``null`` is allowed too."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False
    integer: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.choices:
            text = f"one of {', '.join(self.choices)}"
        else:
            kind = "an integer" if self.integer else "a number"
            show = (lambda x: str(int(x))) if self.integer else (lambda x: f"{x:g}")
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{kind} in {left}{show(self.low)}, {show(self.high)}{right}"
            elif self.low is not None:
                text = f"{kind} {'>' if self.low_open else '>='} {show(self.low)}"
            elif self.high is not None:
                text = f"{kind} {'<' if self.high_open else '<='} {show(self.high)}"
            else:
                text = kind
        return f"{text} or null" if self.nullable else text


def setting(**allowed: Any) -> Any:
    """A schema field: no default here (the YAML holds it), the allowed values as metadata."""
    return field(default=MISSING, metadata={"allowed": Allowed(**allowed)})


def count(low: int = 1, **allowed: Any) -> Any:
    return setting(low=low, integer=True, **allowed)


@dataclass
class TrainerSchema:
    max_steps: int = count()
    val_check_interval: int = count()
    log_every_n_steps: int = count()
    num_nodes: int = count()
    accumulate_grad_batches: int = count()


@dataclass
class SystemSchema:
    render_resolution: Any = setting()  # a side or milestones: :func:`check_resolution`
    prompts_per_step: int = count()
    lr_generator: float = setting(low=0.0, low_open=True)
    lr_renderer: float = setting(low=0.0)
    lr_final_ratio: float = setting(low=0.0, high=1.0, low_open=True)
    image_every_n_steps: int = count(low=0)
    num_workers: int = count(low=0)


@dataclass
class ValidationOrbitSchema:
    num_views: int = count()
    distance: float = setting(low=0.0, low_open=True)
    fovy_deg: float = setting(low=0.0, high=180.0, low_open=True, high_open=True)
    resolution: Any = setting()


@dataclass
class DistillerSchema:
    guidance_scale: float = setting(low=0.0)
    eta: float = setting(low=0.0, high=1.0)
    shift_mode: str = setting(choices=("random", "deterministic", "none"))
    weighting: str = setting(choices=("sds", "uniform", "fantasia", "recon"))
    grad_clip: float | None = setting(low=0.0, low_open=True, nullable=True)
    guidance_rescale: float = setting(low=0.0, high=1.0)


@dataclass
class CorpusSchema:
    num_prompts: int = count()
    num_test_prompts: int = count()
    test_split: str = setting(choices=("train", "heldout"))


@dataclass
class RendererSchema:
    radius: float = setting(low=0.0, low_open=True)
    num_samples_stratified: int = count()
    num_samples_importance: int = count(low=0)
    background_augmentation_prob: float = setting(low=0.0, high=1.0)


@dataclass
class CheckpointSchema:
    every_n_train_steps: int = count()


@dataclass
class NonFiniteGuardSchema:
    max_consecutive: int = count()


@dataclass
class RunSchema:
    seed: int = count(low=0, high=2**32 - 1)


#: Config section -> its schema (``""``: top-level keys).
SECTIONS: dict[str, type] = {
    "": RunSchema,
    "trainer": TrainerSchema,
    "system": SystemSchema,
    "system.validation": ValidationOrbitSchema,
    "distiller": DistillerSchema,
    "corpus": CorpusSchema,
    "renderer": RendererSchema,
    "callbacks.checkpoint": CheckpointSchema,
    "callbacks.nonfinite_guard": NonFiniteGuardSchema,
}

_store = ConfigStore.instance()
for _section, _schema in SECTIONS.items():
    _store.store(group="schema", name=_section or "run", node=_schema)

_ABSENT = object()


def check_resolution(key: str, value: Any) -> None:
    """A render side (integer >= 8) or milestones ``{fraction in [0, 1]: side}`` from 0."""
    allowed = "a side >= 8 or milestones {fraction in [0, 1] starting at 0: side >= 8}"
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        try:
            milestones = {float(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ConfigValueError(key, value, allowed) from None
        if (
            not milestones
            or min(milestones) != 0.0
            or max(milestones) > 1.0
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 8
                for v in milestones.values()
            )
        ):
            raise ConfigValueError(key, value, allowed)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        raise ConfigValueError(key, value, allowed)


def _check_section(cfg: DictConfig, section: str, schema: type) -> None:
    node = OmegaConf.structured(schema)
    for spec in fields(schema):
        key = f"{section}.{spec.name}" if section else spec.name
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        allowed: Allowed | None = spec.metadata.get("allowed")
        if spec.name in ("render_resolution", "resolution"):
            check_resolution(key, value)
            continue
        assert allowed is not None
        try:
            node[spec.name] = value  # OmegaConf's type check and conversion ("5" -> 5)
        except ValidationError:
            raise ConfigValueError(key, value, allowed.describe()) from None
        converted = node[spec.name]
        if isinstance(converted, str) and not allowed.choices:
            raise ConfigValueError(key, value, allowed.describe())
        if not allowed.accepts(converted):
            raise ConfigValueError(key, value, allowed.describe())


def check_timestep_schedules(cfg: DictConfig) -> None:
    """``distiller.t_min`` <= ``distiller.t_max`` at every point of the run, both in [0, 999]."""
    if "t_min" not in cfg.distiller or "t_max" not in cfg.distiller:
        return
    t_min, t_max = instantiate(cfg.distiller.t_min), instantiate(cfg.distiller.t_max)
    breakpoints = {0.0, 1.0}
    for node in (cfg.distiller.t_min, cfg.distiller.t_max):
        breakpoints.update(float(node.get(k)) for k in ("begin", "end_at") if k in node)
    for fraction in sorted(breakpoints):
        low, high = t_min(fraction), t_max(fraction)
        for name, value in (("t_min", low), ("t_max", high)):
            if not 0 <= value <= 999:
                raise ConfigValueError(
                    f"distiller.{name}", cfg.distiller[name], "timesteps in [0, 999] over the run"
                )
        if low > high:
            raise ConfigValueError(
                "distiller.t_max",
                cfg.distiller.t_max,
                f"t_max >= t_min over the whole run (at fraction {fraction:g} of the run "
                f"t_min is {low:g} and t_max {high:g})",
            )


def validate_train_config(cfg: DictConfig) -> None:
    """Check every schema'd value of a composed ``train.py`` config; the first bad value raises
    :class:`ConfigValueError` (``key=value: allowed ...``)."""
    for section, schema in SECTIONS.items():
        if not section or OmegaConf.select(cfg, section, default=None) is not None:
            _check_section(cfg, section, schema)
    check_timestep_schedules(cfg)
