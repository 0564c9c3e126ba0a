"""Typed job configs: nested dataclasses read from YAML, overridden from the command line, typos refused.

A job describes its options once, as nested dataclasses whose fields carry a ``help`` string in their
metadata. This module turns a YAML file plus ``key.sub=value`` overrides into an instance, checking
every key and coercing every value to the declared type, and prints the full option list for ``--help``.

Example::

    @dataclass
    class Optim:
        lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})

    @dataclass
    class Job:
        optim: Optim = field(default_factory=Optim)

    cfg = load_config(Job, "job.yaml", ["optim.lr=5e-4"])   # Job(optim=Optim(lr=0.0005))
    load_config(Job, None, ["optim.lrr=1"])                 # ValueError: unknown config key 'optim.lrr' ...
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "describe_config",
    "parse_value",
    "save_config",
    "resolve_recipe_path",
]


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse one override value the way YAML would (``[1, 2]`` -> list, ``1e-3`` -> float, ``null`` -> None)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in known], n=1)
    hint = f"; did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid here: {', '.join(sorted(known))})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (as read from YAML) to the annotated type ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return config_from_dict(tp, value, prefix=key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, tp):
            return value
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, refusing unknown keys and ill-typed values.

    Raises:
        ConfigError: a key that ``cls`` does not declare (with the closest valid name) or a bad value.
    """
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise _unknown_key(full, [f"{prefix}.{k}" if prefix else k for k in fields])
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalars of a config (Enums by value, tuples as lists): YAML/JSON-ready."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def _is_free_mapping(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return tp is dict or typing.get_origin(tp) is dict


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``section.key=value`` overrides into the nested mapping ``data`` (a copy is returned).

    Keys are checked against ``cls`` as they are walked, so a typo fails here with a suggestion.
    Inside a free-form mapping field (annotated ``dict``) any sub-key is accepted.
    """
    import copy

    data = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        node: dict[str, Any] = data
        tp: Any = cls
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if tp is not None and dataclasses.is_dataclass(tp):
                fields = _fields(tp)
                if part not in fields:
                    prefix = ".".join(parts[:depth])
                    raise _unknown_key(here, [f"{prefix}.{k}" if prefix else k for k in fields])
                sub_tp = _strip_optional(_hints(tp)[part])
            else:  # inside a free-form mapping
                sub_tp = None
            if last:
                node[part] = parse_value(text)
                break
            if not (sub_tp is None or dataclasses.is_dataclass(sub_tp) or _is_free_mapping(sub_tp)):
                raise ConfigError(f"config key '{here}' is a value, not a section; cannot set '{path}'")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            tp = sub_tp if sub_tp is not None and dataclasses.is_dataclass(sub_tp) else None
    return data


def _merge_defaults(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``cls`` with ``data`` laid over them, section by section (free mappings are replaced)."""
    return _deep_merge(config_to_dict(cls()), data)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read ``cls`` from a YAML file (or defaults when ``path`` is None), then apply overrides.

    Args:
        cls: a dataclass whose fields all have defaults (sections as ``default_factory``).
        path: YAML file with a nested mapping of the same shape; missing keys keep their defaults.
        overrides: ``section.key=value`` strings; values are parsed as YAML.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown key, wrong type, or a file that is not a mapping.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.load(path.read_text(), Loader=_Loader)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        config_from_dict(cls, loaded)  # validate the file's own keys first so errors name the file's typo
        data = dict(loaded)
    data = apply_overrides(cls, data, overrides)
    return config_from_dict(cls, _merge_defaults(cls, data))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (readable back by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_config(cls: type, prefix: str = "") -> str:
    """One line per option: ``key = default  help`` (for ``--help``), sections in declaration order."""
    lines = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {f.metadata.get('help', '')}".rstrip())
            lines.append(describe_config(tp, prefix=f"{key}."))
            continue
        value = config_to_dict(getattr(defaults, f.name))
        choices = f" {{{', '.join(m.value for m in tp)}}}" if isinstance(tp, type) and issubclass(tp, enum.Enum) else ""
        lines.append(f"  {key} = {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                     f"{choices}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)


def resolve_recipe_path(name_or_path: str | Path, recipe_dir: str | Path) -> Path:
    """A config file path, or the bare name of a recipe ``<recipe_dir>/<name>.yaml``.

    Raises:
        FileNotFoundError: neither exists (the message lists the recipes).
    """
    path, recipe_dir = Path(name_or_path), Path(recipe_dir)
    if path.is_file():
        return path
    recipe = recipe_dir / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and recipe.is_file():
        return recipe
    known = sorted(p.stem for p in recipe_dir.glob("*.yaml")) if recipe_dir.is_dir() else []
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a recipe in {recipe_dir} "
                            f"(recipes: {', '.join(known) or 'none'})")
