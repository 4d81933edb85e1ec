"""Training configs: a base config, a short job module over it, and `key=value` overrides.

A job config is a Python module in `trainer/configs/` (or any file) that defines `config`, a `Config`
holding only the keys it changes. `load_config` starts from `trainer/configs/base.py` plus the keys of
the selected training mode (`mode`, from the overrides, else the job module, else the base; the keys are
the `CONFIG` dict of the mode's module in trainer/modes/), applies the job module, then the command-line
overrides. Every key must be declared there, so that a typo, or a key of a mode that is not selected,
is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config module, key or override value is not usable."""


class Config(dict):
    """A dict whose keys read and write as attributes (`config.lr`), as insightface's edict configs do."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def __deepcopy__(self, memo) -> "Config":
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        """A plain dict (for checkpoints and JSON)."""
        return {k: copy.deepcopy(v) for k, v in self.items()}


def _module_from_path(path: Path):
    spec = importlib.util.spec_from_file_location(f"_trainer_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_module(name_or_path: str):
    """`trainer/configs/cpu_demo.py`, `cpu_demo`, or `trainer.configs.cpu_demo`."""
    path = Path(name_or_path)
    if path.suffix == ".py" or os.sep in name_or_path:
        if not path.is_file() and (CONFIG_DIR / path.name).is_file():
            path = CONFIG_DIR / path.name
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return _module_from_path(path)
    if (CONFIG_DIR / f"{name_or_path}.py").is_file():
        return _module_from_path(CONFIG_DIR / f"{name_or_path}.py")
    try:
        return importlib.import_module(name_or_path)
    except ImportError as e:
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no config {name_or_path!r} ({e}); known: {', '.join(known)}") from None


def _unknown_key(key: str, config: dict) -> ConfigError:
    if "mode" in config:
        from trainer.modes import mode_of_key

        owner = mode_of_key(key)
        if owner is not None:
            return ConfigError(f"config key {key!r} belongs to mode {owner!r}, but this config's mode is "
                               f"{config['mode']!r} (set mode={owner} to use it)")
    close = difflib.get_close_matches(key, list(config), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (every key must be declared in configs/base.py "
                       f"or in the mode's CONFIG in trainer/modes/)")


def base_config() -> Config:
    module = _module_from_path(CONFIG_DIR / "base.py")
    return copy.deepcopy(module.config)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def parse_value(text: str, like: Any) -> Any:
    """Convert override text to the type of the base value `like` (None: a Python literal, else the text)."""
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)  # "1e6" for a step count
            except ValueError:
                raise ConfigError(f"expected an integer, got {text!r}") from None
            if not as_float.is_integer():
                raise ConfigError(f"expected an integer, got {text!r}") from None
            return int(as_float)
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if isinstance(like, str):
        return text
    if isinstance(like, (list, tuple, dict)) or like is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if like is None:
                return text
            if isinstance(like, (list, tuple)):
                # "a,b,c" without brackets: a list of strings
                value = [t.strip() for t in text.split(",") if t.strip()]
            else:
                raise ConfigError(f"expected a dict literal, got {text!r}") from None
        if isinstance(like, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(like, list) and isinstance(value, tuple):
            value = list(value)
        if isinstance(like, (list, tuple)) and isinstance(value, (str, int, float)):
            value = type(like)([value])
        if like is not None and not isinstance(value, type(like)):
            raise ConfigError(f"expected a {type(like).__name__}, got {text!r}")
        return value
    raise ConfigError(f"cannot override a value of type {type(like).__name__}")


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Apply `key=value` strings in order; the value is converted to the type the key already has."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in config:
            raise _unknown_key(key, config)
        try:
            config[key] = parse_value(text, config[key])
        except ConfigError as e:
            raise ConfigError(f"override {key}={text}: {e}") from None
    return config


def _selected_mode(base: Config, job: dict, overrides: list[str]) -> str:
    """The training mode the config will have: the last `mode=` override, else the job's, else the base's."""
    mode = job.get("mode", base["mode"])
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip() == "mode":
            mode = text.strip()
    return mode


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> Config:
    """Base config and the mode's keys, then the job module's `config`, then the overrides;
    `config.config_name` names the job."""
    from trainer.modes import UnknownModeError, mode_config

    overrides = list(overrides)
    config = base_config()
    module = _find_module(name_or_path)
    job = getattr(module, "config", None)
    if not isinstance(job, dict):
        raise ConfigError(f"config module {name_or_path} defines no `config` dict")
    config.mode = _selected_mode(config, job, overrides)
    try:
        config.update(mode_config(config.mode))
    except UnknownModeError as e:
        raise ConfigError(str(e)) from None
    for key, value in job.items():
        if key not in config:
            raise _unknown_key(key, config)
        config[key] = copy.deepcopy(value)
    if not config.config_name:
        config.config_name = Path(getattr(module, "__file__", name_or_path) or name_or_path).stem
    apply_overrides(config, overrides)
    return config


# Keys that may differ between the run that saved a checkpoint and the run that resumes from it: where
# the run writes and how it reports, how often it evaluates and saves, how it reads the data (the same
# samples in the same order), the speed switches (memory layout, cuDNN, TF32, deterministic kernels),
# and where it stops (max_steps: the lr curve spans num_epoch, so a longer max_steps continues the same
# curve; a longer num_epoch stretches the curve, and is a change). `data` may name the same pack moved
# elsewhere; another dataset is caught by the classifier's class count. Everything else (lr, batch_size,
# network, loss, num_epoch, seed, ...) changes what is trained: a resume with such a change is refused
# unless `allow_config_change` (or --allow-config-change) says it is meant.
RESUME_FREE_KEYS = frozenset({
    "config_name", "output", "data", "max_steps", "auto_resume", "allow_config_change",
    "frequent", "progress_bar", "tensorboard", "wandb", "wandb_project", "wandb_entity", "wandb_run_name",
    "verbose", "val_targets", "val_batch_size", "val_align",
    "save_every", "save_epoch_end", "keep_checkpoints", "max_nan_steps",
    "loader_backend", "num_threads", "dali_threads", "dali_hw_decoder_load", "dali_dont_use_mmap",
    "cudnn_benchmark", "tf32", "deterministic", "channels_last",
})


def _comparable(value: Any) -> Any:
    """Tuples and lists alike (a config read back from JSON has lists), dict key order ignored."""
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_diff(saved: dict, current: dict, free: Iterable[str] = RESUME_FREE_KEYS) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key that differs, `free` keys left out. A key the
    saved config lacks (a checkpoint of an older trainer) is not compared."""
    free = set(free)
    return {k: (saved[k], current[k]) for k in current
            if k not in free and k in saved and _comparable(saved[k]) != _comparable(current[k])}


def describe_diff(diff: dict[str, tuple]) -> str:
    """`lr 0.1 -> 0.05, network 'r50' -> 'r100'`"""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
