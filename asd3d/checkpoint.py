"""Checkpoints: written atomically with finite weights only; a run is rebuilt from its recipe.

Every checkpoint carries the run's *recipe* (:data:`~asd3d.io.RECIPE_KEY`): the option chosen in
each config group of ``conf/`` (Hydra's ``runtime.choices``), the command-line overrides
(``overrides.task``) and the run's W&B id. Resuming (``python train.py ckpt_path=...``),
``evaluate.py``, ``export_mesh.py`` and ``DistillationSystem.load_from_checkpoint`` compose the
project's own ``conf/`` with that recipe; the composed config is the only one anything is
instantiated from. The resolved config stored beside it (:data:`~asd3d.io.CONFIG_KEY`) is a
record for people and dashboards and is never built.

A recipe is refused, with one line and before anything runs, when it could make composition build
something the project did not choose: a key or value naming ``_target_``, ``_partial_``,
``_args_``, ``_recursive_`` or ``_convert_``, an interpolation (``${...}``), a ``hydra.*`` setting,
a package relocation (``group@pkg=...``), a sweep, or a group option that is not a file in
``conf/``. Checkpoints written before recipes existed are refused as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from asd3d.io import (
    RECIPE_KEY,
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: Config keys that make Hydra import and call something: never accepted from a checkpoint.
INSTANTIATION_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
#: Task overrides that describe one invocation, not the run (the resumed checkpoint itself).
_NOT_RECIPE = ("ckpt_path",)
_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*$")


def config_groups() -> set[str]:
    """Config groups of ``conf/`` a recipe may choose options of (``hydra`` excluded)."""
    return {
        str(path.relative_to(CONF_DIR))
        for path in CONF_DIR.rglob("*")
        if path.is_dir() and path.parts[len(CONF_DIR.parts)] != "hydra"
    }


def _option_exists(group: str, option: str) -> bool:
    if not _OPTION.match(option) or ".." in option:
        return False
    return (CONF_DIR / group / f"{option}.yaml").is_file()


def _parse(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def _override_key(text: str) -> str:
    """The key an override sets (``trainer.max_steps``, ``generator``), for merging lists."""
    return _parse(text).get_key_element().lstrip("+~")


def _unsafe_value(value: Any) -> str | None:
    """What makes a parsed override value unsafe to compose, or ``None``."""
    if isinstance(value, str):
        if "${" in value:
            return "an interpolation"
        return next((f"'{k}'" for k in INSTANTIATION_KEYS if k in value), None)
    if isinstance(value, Mapping):
        for key, item in value.items():
            reason = _unsafe_value(str(key)) or _unsafe_value(item)
            if reason:
                return reason
        return None
    if isinstance(value, (list, tuple)):
        return next((r for r in map(_unsafe_value, value) if r), None)
    return None


def check_override(text: str, where: str) -> str:
    """``text`` if it is a safe override to compose from a checkpoint; else :class:`CheckpointError`."""

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{where} is refused: its stored override {text!r} {reason}")

    if not isinstance(text, str):
        raise refuse("is not a string")
    named = next((k for k in INSTANTIATION_KEYS if k in text), None)
    if named:
        raise refuse(f"names {named}, which would instantiate code the project did not choose")
    try:
        override = _parse(text)
    except Exception as error:  # noqa: BLE001 -- Hydra's grammar raises several types
        raise refuse(f"is not a Hydra override ({type(error).__name__})") from None
    key = override.key_or_group
    if key.split(".")[0].split("/")[0] == "hydra":
        raise refuse("changes Hydra's own settings")
    if override.package is not None:
        raise refuse("moves a config group to another package")
    if override.is_sweep_override():
        raise refuse("is a sweep")
    value = override.value()
    reason = _unsafe_value(value)
    if reason:
        raise refuse(f"uses {reason}")
    if key in config_groups() and value is not None:
        options = value if isinstance(value, list) else [value]
        for option in options:
            if not (isinstance(option, str) and _option_exists(key, option)):
                raise refuse(f"selects {key} option {option!r}, which is not in conf/{key}/")
    return text


@dataclass(frozen=True)
class RunRecipe:
    """What rebuilds a run from the project's own ``conf/``.

    Args:
        choices: config group -> chosen option (``{"generator": "3dconv_small", ...}``).
        overrides: the command-line overrides of the run, in order (``["trainer.max_steps=5"]``).
        wandb_id: the run's W&B id, so that a resumed run continues the same W&B run.
    """

    choices: dict[str, str]
    overrides: tuple[str, ...]
    wandb_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain containers only: what :func:`~asd3d.io.load_checkpoint` reads back safely."""
        return {
            "choices": dict(self.choices),
            "overrides": list(self.overrides),
            "wandb_id": self.wandb_id,
        }

    @classmethod
    def of_this_run(cls, wandb_id: str | None) -> RunRecipe:
        """The recipe of the running Hydra job (``train.py``)."""
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        groups = config_groups()
        choices = {
            group: option
            for group, option in hydra_cfg.runtime.choices.items()
            if group in groups and option is not None
        }
        overrides = tuple(
            o for o in hydra_cfg.overrides.task if _override_key(o) not in _NOT_RECIPE
        )
        return cls(choices=choices, overrides=overrides, wandb_id=wandb_id)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], where: str) -> RunRecipe:
        """The checkpoint's recipe, checked; :class:`CheckpointError` (one line) if unsafe."""
        stored = checkpoint.get(RECIPE_KEY)
        if stored is None:
            raise CheckpointError(
                f"{where} has no run recipe (config group choices and overrides): it was written "
                "by an older asd3d, and rebuilding it from its stored config could run code from "
                "the file, so it is refused; retrain with this version"
            )
        if not (
            isinstance(stored, Mapping)
            and isinstance(stored.get("choices"), Mapping)
            and isinstance(stored.get("overrides"), (list, tuple))
        ):
            raise CheckpointError(f"{where} is refused: its run recipe is malformed")
        groups = config_groups()
        choices: dict[str, str] = {}
        for group, option in stored["choices"].items():
            if group not in groups:
                raise CheckpointError(
                    f"{where} is refused: it chooses config group {group!r}, which is not in conf/"
                )
            if not (isinstance(option, str) and _option_exists(group, option)):
                raise CheckpointError(
                    f"{where} is refused: it chooses {group} option {option!r}, which is not in "
                    f"conf/{group}/"
                )
            choices[group] = option
        overrides = tuple(check_override(o, where) for o in stored["overrides"])
        wandb_id = stored.get("wandb_id")
        if wandb_id is not None and not (isinstance(wandb_id, str) and _WANDB_ID.match(wandb_id)):
            raise CheckpointError(f"{where} is refused: its W&B id {wandb_id!r} is malformed")
        return cls(choices=choices, overrides=overrides, wandb_id=wandb_id)

    def overrides_with(self, extra: Sequence[str] = ()) -> list[str]:
        """The overrides that rebuild the run: each stored group choice, the stored overrides,
        then ``extra`` (the user's, trusted) -- a later override of the same key replaces an
        earlier one."""
        merged: dict[str, str] = {group: f"{group}={opt}" for group, opt in self.choices.items()}
        for text in (*self.overrides, *extra):
            key = _override_key(text)
            merged.pop(key, None)  # re-insert: the later override keeps its place in order
            merged[key] = text
        return list(merged.values())


def compose_run_config(
    recipe: RunRecipe, extra_overrides: Sequence[str] = (), run_dir: Path | None = None
) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``recipe`` (and ``extra_overrides`` on top).

    Works inside another Hydra app (``evaluate.py``) and outside any (a notebook): there,
    ``${hydra:...}`` interpolations resolve as in a run whose directory is ``run_dir``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    overrides = recipe.overrides_with(extra_overrides)
    inside_app = HydraConfig.initialized()
    running_app = get_gh_backup()  # the calling app's Hydra (evaluate.py), restored afterwards
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            cfg = compose("train", overrides=overrides, return_hydra_config=not inside_app)
    finally:
        restore_gh_from_backup(running_app)
    if not inside_app:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir or Path.cwd())
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    elif run_dir is not None:  # inside evaluate.py: the run's paths, not the calling app's
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    if recipe.wandb_id is not None and cfg.get("logger") and "wandb" in cfg.logger:
        with open_dict(cfg):
            cfg.logger.wandb.run_id = recipe.wandb_id  # evaluate.py logs into the same W&B run
    return cfg


def check_loadable_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str
) -> None:
    """One line instead of Lightning's list of mismatches when ``state`` does not fit ``module``,
    or when it holds non-finite values (NaN/inf weights are never loaded)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        example = (
            f"{mismatched[0]} is {list(state[mismatched[0]].shape)} in the checkpoint, "
            f"{list(expected[mismatched[0]].shape)} here"
            if mismatched
            else f"{(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}"
        )
        raise CheckpointError(
            f"{where} does not fit the configured model ({len(mismatched)} tensors differ in "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected; e.g. {example}): "
            "it was trained with another generator/renderer config"
        )
    bad = next(
        (k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if bad is not None:
        raise CheckpointError(f"{where} holds non-finite values (NaN/inf) in {bad}")


def load_trained_system(path: str | Path, overrides: Sequence[str] = (), map_location: Any = None):
    """The :class:`~asd3d.system.DistillationSystem` of a checkpoint, rebuilt from its recipe."""
    from asd3d.build import build_system

    path = Path(path)
    where = f"checkpoint {path}"
    checkpoint = load_checkpoint(path)
    recipe = RunRecipe.from_checkpoint(checkpoint, where)
    cfg = compose_run_config(recipe, overrides, run_dir=path.resolve().parent.parent)
    run_config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    system = build_system(cfg, run_config)  # the composed config, never the stored one
    system.run_recipe = recipe.as_dict()
    check_loadable_state(system, checkpoint["state_dict"], where)
    system.load_state_dict(checkpoint["state_dict"])
    return system.to(map_location) if map_location is not None else system


def resume_argv(argv: Sequence[str]) -> list[str]:
    """``train.py``'s arguments with the recipe of ``ckpt_path=...`` in front of the user's own.

    ``python train.py ckpt_path=<run>/checkpoints/last.ckpt [overrides]`` thus composes the
    checkpoint's run (its group choices and overrides, the user's on top) and continues in the
    checkpoint's run directory (unless ``hydra.run.dir`` is given). Other command lines, and
    sweeps, are returned unchanged. Applying it twice gives the same result (DDP children re-run
    the rewritten command line).
    """
    from hydra._internal.utils import get_args_parser

    argv = list(argv)
    args = get_args_parser().parse_args(argv)
    user = list(args.overrides)
    paths = [o.split("=", 1)[1] for o in user if o.split("=", 1)[0] == "ckpt_path"]
    if args.multirun or len(paths) != 1 or paths[0].strip("'\"") in ("", "null"):
        return argv
    path = Path(paths[0].strip("'\""))
    checkpoint = load_checkpoint(path)
    recipe = RunRecipe.from_checkpoint(checkpoint, f"checkpoint {path}")
    run_dir = path.resolve().parent.parent
    if path.resolve().parent.name == "checkpoints" and not any(
        o.startswith("hydra.run.dir=") for o in user
    ):
        quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
        user.append(f"hydra.run.dir='{quoted}'")
    flags = [a for a in argv if a not in args.overrides]
    return [*flags, *recipe.overrides_with(user)]


def _non_finite_entry(checkpoint: Mapping[str, Any]) -> str | None:
    """The first weight or optimizer-state tensor of ``checkpoint`` holding NaN/inf, if any."""
    for key, value in checkpoint.get("state_dict", {}).items():
        if value.is_floating_point() and not value.isfinite().all():
            return key
    for i, optimizer in enumerate(checkpoint.get("optimizer_states", [])):
        for param, state in optimizer.get("state", {}).items():
            for name, value in state.items():
                floating = isinstance(value, torch.Tensor) and value.is_floating_point()
                if floating and not value.isfinite().all():
                    return f"optimizer {i} state {param}.{name}"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written file, never writes non-finite
    weights and never unpickles code.

    Saving goes to a temporary file in the same directory, renamed over the target when complete;
    a checkpoint whose weights or optimizer state hold NaN/inf is refused (:class:`CheckpointError`)
    and the previous file stays. Loading uses ``torch.load(weights_only=True)``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        bad = _non_finite_entry(checkpoint)
        if bad is not None:
            raise CheckpointError(
                f"refusing to write checkpoint {path}: {bad} holds non-finite values (NaN/inf)"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(Path(path))
