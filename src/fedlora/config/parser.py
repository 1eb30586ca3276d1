"""Reading a config: YAML file + `--set key=value` overrides, renamed keys, type checks; and writing it back.

Unknown keys are rejected with a "did you mean" suggestion. Overrides may use the full dotted path
(`federation.rounds=5`) or, when it is unique, the bare field name (`rounds=5`). A key that was renamed
(RENAMED) still works under its old name, with a one-line notice on stderr.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .schema import Config, _suggest

RENAMED: dict[str, tuple[str, str]] = {
    # old dotted path: (new dotted path, what the new name means)
    "train.local_steps": ("train.global_steps", "the global phase's steps per client-round"),
}
"""Keys that were renamed. The old name keeps working (a notice on stderr); giving both is an error."""


def rename_notice(old: str) -> str:
    new, meaning = RENAMED[old]
    return f"note: {old} is deprecated; it is {new} ({meaning})"


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce/validate `value` against the annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:  # YAML 1.1 reads a bare off/on as a bool
            return "on" if value else "off"
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_check_type(path, k, args[0]): _check_type(f"{path}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, tp)
    return cls(**kwargs)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _renamed_from(key: str, paths: list[str]) -> str | None:
    """The old dotted path that the `--set` key `key` names (dotted, or a bare name no current field has)."""
    if key in RENAMED:
        return key
    if any(p.split(".")[-1] == key for p in paths):
        return None
    olds = [old for old in RENAMED if old.split(".")[-1] == key]
    return olds[0] if len(olds) == 1 else None


def resolve_key(key: str) -> str:
    """Map a `--set` key (dotted path or unique leaf name; an old name maps to its new one) to its dotted path."""
    paths = _leaf_paths(Config)
    if key in paths:
        return key
    old = _renamed_from(key, paths)
    if old is not None:
        return RENAMED[old][0]
    # dict-valued leaves accept sub-keys: method_options.lr_mult.A.mag=10
    for p in paths:
        if key.startswith(p + "."):
            return key
    matches = [p for p in paths if p.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--set {key}: ambiguous, use one of {', '.join(matches)}")
    raise ConfigError(f"--set {key}: unknown config key{_suggest(key, paths + [p.split('.')[-1] for p in paths])}")


def _parse_override(item: str) -> tuple[str, Any, str | None]:
    """A `--set KEY=VALUE`'s dotted path, value, and the old dotted path if KEY is a renamed key's old name."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    key = key.strip()
    return resolve_key(key), value, _renamed_from(key, _leaf_paths(Config))


def _apply(tree: dict, dotted: str, value: Any) -> None:
    """Set `section.field` (or `section.dictfield.key`, e.g. method_options.lr_mult.A.mag) in the raw tree."""
    parts = dotted.split(".")
    if len(parts) == 1:
        tree[parts[0]] = value
        return
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping, got {section!r}")
    if len(parts) == 2:
        section[parts[1]] = value
        return
    sub = section.setdefault(parts[1], {})
    if not isinstance(sub, dict):
        raise ConfigError(f"{parts[0]}.{parts[1]}: expected a mapping, got {sub!r}")
    sub[".".join(parts[2:])] = value


def _both_given(where: str, old: str) -> ConfigError:
    new = RENAMED[old][0]
    return ConfigError(f"{where}: both {old} and {new} are given; {old} is the old name of {new}, keep one")


def _parent(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping in `tree` that holds the dotted path's last part (None if there is none), and that part."""
    *head, leaf = dotted.split(".")
    parent: Any = tree
    for part in head:
        parent = parent.get(part) if isinstance(parent, dict) else None
    return (parent if isinstance(parent, dict) else None), leaf


def _rename_in_tree(tree: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """A copy of `tree` with each old key moved to its new name, and the old keys found.

    `where` names the source in the error when both the old and the new key are given.
    """
    tree, found = copy.deepcopy(tree), []
    for old, (new, _) in RENAMED.items():
        parent, leaf = _parent(tree, old)
        if parent is None or leaf not in parent:
            continue
        new_parent, new_leaf = _parent(tree, new)
        if new_parent is not None and new_leaf in new_parent:
            raise _both_given(where, old)
        _apply(tree, new, parent.pop(leaf))
        found.append(old)
    return tree, found


def _print_notices(olds: list[str]) -> None:
    for old in dict.fromkeys(olds):  # each once, in the order first met
        print(rename_notice(old), file=sys.stderr)


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"config file {p}: key '{e.key}' appears twice (line {e.line}); keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a YAML file (or the defaults) with `--set` overrides applied, checked.

    An old (renamed) key prints one notice line on stderr per load, only once the config is valid.
    """
    tree: dict[str, Any] = {}
    olds: list[str] = []
    if path is not None:
        p = Path(path)
        tree, olds = _rename_in_tree(_read_yaml(p), f"config file {p}")
    new_paths = {new for new, _ in RENAMED.values()}
    by_old: dict[str, str] = {}  # new dotted path -> the old one that a --set named it by
    by_new: set[str] = set()  # new dotted paths that a --set named by their new name
    for item in overrides or []:
        key, value, old = _parse_override(item)
        if old is not None:
            by_old[key] = old
            olds.append(old)
        elif key in new_paths:
            by_new.add(key)
        if key in by_old and key in by_new:
            raise _both_given("--set", by_old[key])
        _apply(tree, key, value)
    cfg = _build(Config, tree, "")
    cfg.validate()
    _print_notices(olds)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """The config of an already-parsed tree (a saved config.yaml or checkpoint), checked; old keys are renamed."""
    if isinstance(tree, dict):
        tree, olds = _rename_in_tree(tree, "config")
    else:
        olds = []
    cfg = _build(Config, tree, "")
    cfg.validate()
    _print_notices(olds)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
