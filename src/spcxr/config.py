"""Typed configs: dataclasses that are at once CLI flags, YAML files and resolved-config records.

Every command's settings are a dataclass (nested dataclasses for groups such as ``split``).
:func:`add_arguments` turns the fields into flags (``split.mode`` -> ``--split-mode``; help
text from the dataclass docstring's ``Attributes:`` section), and :func:`resolve` builds the
config from defaults, then a YAML file (``--config``), then the flags given. YAML keys may be
nested (``split: {mode: official}``) or flat, spelled like the flags (``split_mode: official``).
A YAML file may start from another (``base: other.yaml``, relative to the file): it then says
only what differs, and its keys win.
The resolved config is written next to every run's outputs with :func:`save_yaml`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute descriptions from a Google-style ``Attributes:`` docstring section."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    section = doc.split("Attributes:", 1)
    if len(section) < 2:
        return docs
    current = None
    for line in section[1].splitlines():
        match = re.match(r"^\s{4}(\w+)(?: \(.*?\))?:\s*(.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted name, field, resolved type, help) for every leaf field of a dataclass."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp, docs.get(f.name, "")


def _flag(dotted: str) -> str:
    return "--" + dotted.replace(".", "-").replace("_", "-")


def _dest(dotted: str) -> str:
    return "cfg__" + dotted.replace(".", "__")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, positional: dict[str, str] | None = None
) -> None:
    """Add a flag for each field of ``cls`` (defaults suppressed: unset flags stay unset).

    Args:
        parser: the subcommand's parser.
        cls: the config dataclass.
        positional: fields given as positional arguments instead (name -> metavar).
    """
    positional = positional or {}
    parser.add_argument("--config", type=Path, help="YAML file whose keys match these flags")
    for dotted, f, tp, help_text in _walk(cls):
        base, _ = _unwrap_optional(tp)
        origin = typing.get_origin(base)
        kwargs: dict[str, Any] = {
            "dest": _dest(dotted),
            "default": argparse.SUPPRESS,
            "metavar": dotted.rsplit(".", 1)[-1].upper(),
        }
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        kwargs["help"] = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help strings
        if dotted in positional:
            kwargs.pop("dest")
            kwargs.pop("metavar")
            parser.add_argument(
                _dest(dotted),
                metavar=positional[dotted],
                nargs="*" if origin in (tuple, list) else "?",
                default=argparse.SUPPRESS,
                help=kwargs["help"],
            )
            continue
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar")
        elif origin in (tuple, list):
            args = typing.get_args(base)
            item = args[0] if args else str
            kwargs["type"] = item if item in (int, float, str) else str
            kwargs["nargs"] = len(args) if origin is tuple and Ellipsis not in args else "*"
            if origin is list:
                kwargs["action"] = "extend"
                kwargs["nargs"] = "+"
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            kwargs["type"] = str
        parser.add_argument(_flag(dotted), **kwargs)


def config_keys(cls: type) -> set[str]:
    """Every dotted setting of a settings class (``train.optim.lr``, ...)."""
    return {dotted for dotted, *_ in _walk(cls)}


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["train"]["optim"]["lr"] = value`` for ``dotted`` ``train.optim.lr`` (nested dicts
    made where missing)."""
    parts = dotted.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def get_dotted(data: dict[str, Any], dotted: str) -> Any:
    """``data["train"]["optim"]["lr"]`` for ``dotted`` ``train.optim.lr`` (tuples as lists, as
    YAML and the grid spell them)."""
    for part in dotted.split("."):
        data = data[part]
    return list(data) if isinstance(data, tuple) else data


def _flatten_yaml(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Accept nested or flat (flag-spelled) YAML keys; reject unknown keys."""
    leaves = {dotted for dotted, *_ in _walk(cls)}
    by_flat = {d.replace(".", "_"): d for d in leaves}
    out: dict[str, Any] = {}

    def visit(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            key_norm = str(key).replace("-", "_")
            dotted = f"{prefix}{key_norm}"
            if dotted in leaves:
                out[dotted] = value
            elif isinstance(value, dict) and any(leaf.startswith(dotted + ".") for leaf in leaves):
                visit(dotted + ".", value)
            elif not prefix and key_norm in by_flat:
                out[by_flat[key_norm]] = value
            else:
                raise ValueError(f"unknown config key {dotted!r}; known: {sorted(leaves)}")

    visit("", raw or {})
    return out


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a plain dict, converting lists to tuples where typed so."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def read_chain(path: str | Path, inherit: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """A YAML config file and the files it starts from, the furthest base first.

    ``base: OTHER.yaml`` (relative to the file that names it) makes a file a set of changes to
    another, which may itself name a base; each mapping is returned without its ``base`` key.
    With ``inherit`` off (a command whose own setting is called ``base``, as ``spcxr sweep``'s
    recipe file) the file is read alone and keeps its ``base`` key.

    Raises:
        ValueError: a file that is not a mapping, or a chain of bases that comes back on itself.
    """
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current: Path | None = Path(path)
    while current is not None:
        if current.resolve() in seen:
            names = " -> ".join(str(p) for p in [*seen, current.resolve()])
            raise ValueError(f"{current}: its chain of base configs comes back on itself: {names}")
        seen.append(current.resolve())
        raw = yaml.safe_load(current.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{current}: a config file must be a mapping of keys to values")
        base = raw.pop("base", None) if inherit else None
        chain.append((current, raw))
        current = current.parent / str(base) if base else None
    return chain[::-1]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The nested settings a YAML file (and its bases) give, each spelled as ``cls`` knows it."""
    data: dict[str, Any] = {}
    # Flattened file by file, so that a nested key in one file and the flag spelling of the
    # same setting in another (``model: {arch: ...}`` / ``model_arch: ...``) still override.
    for file, raw in read_chain(path, inherit="base" not in config_keys(cls)):
        try:
            flat = _flatten_yaml(cls, raw)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None
        for dotted, value in flat.items():
            set_dotted(data, dotted, value)
    return data


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults, then ``--config`` YAML (after its ``base:`` files), then the flags given."""
    data: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path is not None:
        data = _read_settings(cls, config_path)
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            set_dotted(data, key[5:].replace("__", "."), value)
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain, YAML-safe data (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def save_yaml(config: Any, path: str | Path) -> None:
    """Write the resolved config (atomically) as YAML."""
    from spcxr.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config written by :func:`save_yaml` (or by hand, ``base:`` files included)."""
    return from_dict(cls, _read_settings(cls, path))
