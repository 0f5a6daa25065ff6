"""Typed configs: dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Length (~480 lines): loading, overrides, shorthands, renames and help are one set of rules, kept in one place.

Every stage declares one dataclass tree (see ``alignment/sft.py``); fields are declared with
:func:`option`, which records a one-line doc shown by ``align <stage> --help``.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["train.max_steps=5", "model.name=tiny-llama"])

Rules (all enforced here, once, for every stage):
- an unknown key fails with its dotted name, where it came from (file and line, or the override),
  and the closest valid key;
- a value of the wrong type fails with the field's dotted name and the expected type;
- ``__post_init__`` checks raise :class:`ConfigError` for impossible values; the loader prefixes
  the field's dotted path;
- the resolved config is written beside every output with :func:`save_config`.

A YAML file may carry ``stage: <name>``; loading it for another stage fails, so
``align rm --config configs/sft.yaml`` is caught before anything runs.

Shorthand: a section class may declare ``SHORTHAND: ClassVar[str]``, the field a bare value fills
(``eval.truthfulqa: [a.json]`` is ``eval.truthfulqa: {data: [a.json]}``).

Renamed keys: a config class or section may declare ``RENAMED: ClassVar[dict[str, str]]`` (old dotted
key or section -> new one, relative to it). Files and overrides that use an old name still load, up to version
:data:`RENAMES_END` (then they are refused), with a warning naming the new key; giving both the old and the new
name is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key, type or value is wrong. The message names the key."""

    def __init__(self, key: str, message: str, where: str | None = None, *, show_key: bool = True) -> None:
        self.key = key
        self.message = message
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{key}: {message}" if key and show_key else f"{prefix}{message}")


REPO_ROOT = Path(__file__).resolve().parents[1]  # where the bundled configs/ are (an editable install, a checkout)


def find_config(path: str | Path) -> Path:
    """``path`` as given when it exists; else a relative path such as ``configs/sft.yaml`` found in the
    repository's own ``configs/`` (the bundled configs a round config names), so commands work from any folder."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    bundled = REPO_ROOT / p
    return bundled if bundled.is_file() else p


def option(default: Any = _MISSING, doc: str = "", *, factory: Any = _MISSING) -> Any:
    """A config field with a one-line doc. Use ``factory=`` for lists, dicts and sub-configs."""
    if not doc:
        raise TypeError("every config field needs a doc string")
    kwargs: dict[str, Any] = {"metadata": {"doc": doc}}
    if factory is not _MISSING:
        kwargs["default_factory"] = factory
    elif default is not _MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` when ``condition`` is false (use in ``__post_init__``)."""
    if not condition:
        raise ConfigError(key, message)


# ---------------------------------------------------------------------------------------------
# YAML with key line numbers


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and return (data, {dotted key: 1-based line})."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"invalid YAML: {getattr(exc, 'problem', exc)}", where=f"{source}{line}") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix[:-1]}[{i}].")

    if node is not None:
        walk(node, "")
    return data, lines


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Builder:
    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else self.source

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(prefix.rstrip(".") or "<top>", f"expected a mapping of keys, got {type(data).__name__}",
                              where=self.where(prefix.rstrip(".")))
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                full = f"{prefix}{key}"
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(fields)}"
                raise ConfigError(full, f"unknown key '{full}'{hint}", where=self.where(full), show_key=False)
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], f"{prefix}{name}")
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(f"{prefix}{name}", "required key is missing", where=self.source)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            full = f"{prefix}{exc.key}" if exc.key else prefix.rstrip(".")
            raise ConfigError(full, exc.message, where=self.where(full)) from None

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        fail = ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where=self.where(key))
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key + ".")
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return self.convert(arg, value, key)
                except ConfigError as exc:
                    errors.append(exc)
            # a single non-None option: its own message is the most precise
            if len(errors) == 1:
                raise errors[0]
            raise fail
        if origin is Literal:
            if value in args:
                return value
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}",
                              where=self.where(key))
        if origin in (list, tuple):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[0] in (str, int, float):
                value = [value]  # a scalar where a list is expected: `key=x` on the command line
            if not isinstance(value, (list, tuple)):
                raise fail
            item_tp = args[0] if args else Any
            out = [self.convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return out if origin is list else tuple(out)
        if origin is dict:
            if not isinstance(value, dict):
                raise fail
            vt = args[1] if len(args) == 2 else Any
            return {str(k): self.convert(vt, v, f"{key}.{k}") for k, v in value.items()}
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise fail
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML reads "1e-5" as a string
                try:
                    return float(value)
                except ValueError:
                    raise fail from None
            raise fail
        if tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # e.g. a run name "2024"
            raise fail
        if isinstance(value, tp):
            return value
        raise fail


# ---------------------------------------------------------------------------------------------
# overrides


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(text, "an override must look like key=value (e.g. train.max_steps=5)", where="command line")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "empty key in override", where="command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any, cls: type) -> None:
    """Set ``a.b.c`` in nested dicts, validating every part of the path against ``cls``."""
    parts = key.split(".")
    node = data
    tp: Any = cls
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(key, f"'{prefix}' is not a section; it has no key '{part}'", where="command line")
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
            dotted = f"{prefix}.{part}" if prefix else part
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(dotted, f"unknown key '{dotted}'{hint}",
                              where=f"command line override '{key}={value}'", show_key=False)
        tp = typing.get_type_hints(tp)[part]
        # unwrap Optional[Dataclass]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            dcs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if dcs:
                tp = dcs[0]
        # a dict of sections (e.g. a round's policy.<method>): the next part is a free key
        if typing.get_origin(tp) is dict and i < len(parts) - 1:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node, tp = child, typing.get_args(tp)[1]
            rest = parts[i + 1:]
            if len(rest) == 1:
                node[rest[0]] = value
            else:
                _set_dotted(node.setdefault(rest[0], {}), ".".join(rest[1:]), value, tp)
            return
        if i == len(parts) - 1:
            short = getattr(_section_type(tp), "SHORTHAND", None)
            if short and value is not None and not isinstance(value, dict) and isinstance(node.get(part), dict):
                node[part][short] = value  # `eval.truthfulqa=[x]` sets the data and keeps the section's other keys
            else:
                node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


# ---------------------------------------------------------------------------------------------
# public API


def _section_type(tp: Any) -> Any:
    """The dataclass of a field typed ``Section`` or ``Section | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _expand_shorthands(cls: type, data: Any) -> None:
    """Turn a bare value given for a section with a ``SHORTHAND`` into ``{SHORTHAND: value}``, in place (before
    renames, so an old key renamed into that section finds a mapping there)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        sec = _section_type(hints[f.name])
        if sec is None:
            continue
        value = data[f.name]
        if value is not None and not isinstance(value, dict) and getattr(sec, "SHORTHAND", None):
            data[f.name] = {sec.SHORTHAND: value}
        _expand_shorthands(sec, data[f.name])


def all_renames(cls: type, prefix: str = "") -> dict[str, str]:
    """``RENAMED`` of ``cls`` and of every section below it, as full dotted keys."""
    out = {f"{prefix}{old}": f"{prefix}{new}" for old, new in getattr(cls, "RENAMED", {}).items()}
    for f in dataclasses.fields(cls):
        sec = _section_type(typing.get_type_hints(cls)[f.name])
        if sec is not None and sec is not cls:
            out.update(all_renames(sec, f"{prefix}{f.name}."))
    return out


# Old names load, with a warning, up to this version; from it on they are refused (an unknown key, with
# the new name in the message). The project has not released yet: 0.1.0 is the first release.
RENAMES_END = (0, 2, 0)


def _installed_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("align-rlhf").split(".")[:3] if x.isdigit())
    except PackageNotFoundError:
        return (0, 0, 0)


def _check_rename_allowed(old: str, new: str, where: str) -> None:
    if _installed_version() >= RENAMES_END:
        raise ConfigError(old, f"'{old}' was renamed '{new}' before {'.'.join(map(str, RENAMES_END))}, which no longer "
                               "reads the old name; use the new one", where=where)


def renamed_key(key: str, renames: dict[str, str]) -> tuple[str, str | None]:
    """(the current name of dotted ``key``, the old name it matched or None)."""
    for old, new in renames.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):], old
    return key, None


def _apply_renames(data: dict, lines: dict[str, int], renames: dict[str, str], source: str) -> None:
    """Move every old key or section of a loaded file to its new name (merging sections)."""
    for old, new in renames.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        where = f"{source}:{lines.get(old, '?')}"
        _check_rename_allowed(old, new, where)
        log.warning("%s: '%s' is now '%s'; the old name works until version %s", where, old, new,
                    ".".join(map(str, RENAMES_END)))
        *nparents, nleaf = new.split(".")
        target = data
        for part in nparents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(new, f"'{old}' is renamed '{new}', but '{part}' is not a section here", where=where)
        if isinstance(value, dict) and isinstance(target.get(nleaf), dict):
            both = sorted(set(value) & set(target[nleaf]))
            if both:
                raise ConfigError(new, f"both '{old}.{both[0]}' and its new name '{new}.{both[0]}' are set; keep the new one",
                                  where=where)
            target[nleaf].update(value)
        elif nleaf in target:
            raise ConfigError(new, f"both '{old}' and its new name '{new}' are set; keep the new one", where=where)
        else:
            target[nleaf] = value
        for key in [k for k in lines if k == old or k.startswith(old + ".")]:
            lines[new + key[len(old):]] = lines.pop(key)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    stage: str | None = None,
) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = "defaults"
    if path is not None:
        p = find_config(path)
        source = str(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {path}" + ("" if Path(path).is_absolute() else
                                                                      f" (nor {REPO_ROOT / path})"))
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError("", f"not UTF-8: byte 0x{raw[exc.start]:02x}; save the file as UTF-8",
                              where=f"{source}:{line}") from None
        loaded, lines = _yaml_with_lines(text, source)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("", f"the top level must be a mapping of keys, got {type(loaded).__name__}", where=source)
        data = loaded
    renames = all_renames(cls)
    _expand_shorthands(cls, data)
    _apply_renames(data, lines, renames, source)
    file_stage = data.pop("stage", None)
    if stage is not None and file_stage is not None and file_stage != stage:
        raise ConfigError("stage", f"this file configures the '{file_stage}' stage, not '{stage}'",
                          where=f"{source}:{lines.get('stage', '?')}")
    for text in overrides:
        key, value = _parse_override(text)
        key, old = renamed_key(key, renames)
        if old:
            _check_rename_allowed(text.split("=", 1)[0].strip(), key, "command line")
            log.warning("command line: '%s' is now '%s'; the old name works until version %s",
                        text.split("=", 1)[0].strip(), key, ".".join(map(str, RENAMES_END)))
        _set_dotted(data, key, value, cls)
        lines.pop(key, None)
    _expand_shorthands(cls, data)  # a bare value an override gave a section
    builder = _Builder(source if not overrides else f"{source} (+ command-line overrides)", lines)
    return builder.build(cls, data, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists), ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | Path, stage: str | None = None) -> Path:
    """Write the resolved config as YAML (with ``stage:`` first so it can be loaded back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(cfg)
    if stage:
        data = {"stage": stage, **data}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted key, type, default, doc) for every leaf field of a config class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _section_type(tp) is not None:  # a section, or an optional one (null switches it off)
            yield from iter_fields(_section_type(tp), f"{prefix}{f.name}.")
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        if dataclasses.is_dataclass(default):
            default = to_dict(default)
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [to_dict(d) for d in default]
        yield f"{prefix}{f.name}", tp, default, f.metadata.get("doc", "")


def format_help(cls: type) -> str:
    """The field reference printed by ``align <stage> --help``."""
    rows = []
    section = None
    for key, tp, default, doc in iter_fields(cls):
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            doc_line = (cls.__dataclass_fields__[top].metadata.get("doc", "") if top else "")
            rows.append(f"\n  {top}:  {doc_line}" if top else "")
        rows.append(f"    {key} ({_type_name(tp)}, default {default!r})\n        {doc}")
    return "config fields (set in YAML or as key=value):" + "\n".join(rows)
