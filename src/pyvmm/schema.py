"""Typed configuration, one source of truth: dataclasses whose fields carry their docs.

The machine's options and every device's options are dataclasses declared with
``option(...)``. From those declarations alone this module
- builds them from a JSON object (strict: ``"false"`` is not a bool, ``true`` is not a
  size, an unknown key is an error with a "did you mean"),
- builds them from command-line text (``key=value[,key=value]``, ``,,`` for a literal
  comma; ``on/off/yes/no/true/false/1/0`` for booleans; numbers in any base),
- describes them as JSON Schema and as rows for docs/config.md and ``--help``.
Every error is a ``ConfigError`` with one line naming where and what.

**Why not a library**: msgspec and pydantic both generate JSON Schema, but measured
here msgspec's import adds 13-20 ms to pyvmm's start (it pulls in typing_extensions,
decimal, uuid, inspect) and pydantic more, against a budget of 5 ms; what pyvmm needs —
flat dataclasses of str/int/float/bool/enum/size fields — is this file.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pyvmm.errors import ConfigError

T = TypeVar("T")
MiB = 1 << 20


class Size(int):
    """A size in bytes. Text: '64M', '1G', '4096K', or a bare number of MiB (as QEMU's
    ``-m``); JSON: the same text, or an integer number of MiB — never a boolean."""


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}
_TRUE, _FALSE = ("on", "yes", "true", "1"), ("off", "no", "false", "0")
MAX_SIZE = 1 << 50  # a size beyond this is a typo, not a request


def parse_size(text: str | int) -> int:
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size (use e.g. 64M or 1G)")
    if isinstance(text, int):
        value = text * MiB
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a size (use e.g. 64M or 1G)")
        value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if not 0 <= value <= MAX_SIZE:
        raise ValueError(f"{text!r} is not a usable size")
    return value


def option(default: Any = dataclasses.MISSING, doc: str = "", *, cli: str | None = None,
           short: str | None = None, metavar: str | None = None,
           factory: Callable[[], Any] | None = None, hex: bool = False) -> Any:
    """A configuration field: its default, one line of documentation, and how the
    command line spells it (``cli=""`` keeps it off the command line; ``hex`` shows
    the default in hex)."""
    meta = {"doc": doc, "cli": cli, "short": short, "metavar": metavar, "hex": hex}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any  # the resolved annotation: str, int, float, bool, Size, an Enum, X | None
    base: Any  # the type without "| None"
    optional: bool
    default: Any
    required: bool
    doc: str
    cli: str | None
    short: str | None
    metavar: str | None
    hex: bool = False

    @property
    def key(self) -> str:
        """How JSON and key=value text spell it (``load_addr`` -> ``load_addr``)."""
        return self.name


_FIELDS: dict[type, tuple[FieldInfo, ...]] = {}


def fields_of(cls: type) -> tuple[FieldInfo, ...]:
    """The schema of a config dataclass (computed once per class)."""
    got = _FIELDS.get(cls)
    if got is not None:
        return got
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        t = hints[f.name]
        base, optional = t, False
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            args = [a for a in typing.get_args(t) if a is not type(None)]
            optional = len(args) < len(typing.get_args(t))
            base = args[0] if len(args) == 1 else t
        if typing.get_origin(t) is list:
            base = t  # list[str]: a JSON array; on the command line, the key repeated
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default: Any = None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif not required:
            default = typing.cast(Callable[[], Any], f.default_factory)()
        out.append(FieldInfo(f.name, t, base, optional, default, required,
                             f.metadata.get("doc", ""), f.metadata.get("cli"),
                             f.metadata.get("short"), f.metadata.get("metavar"),
                             bool(f.metadata.get("hex"))))
    _FIELDS[cls] = tuple(out)
    return _FIELDS[cls]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def convert(f: FieldInfo, value: Any, text: bool) -> Any:
    """One value, from JSON (``text`` False) or command-line text (True)."""
    if value is None:
        if f.optional:
            return None
        raise ValueError("must not be null")
    t = f.base
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        if text and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        one = dataclasses.replace(f, base=item, optional=False)
        return [convert(one, v, text) for v in value]
    if isinstance(value, list):
        raise ValueError("given more than once" if text else f"{value!r} is not a single value")
    if isinstance(value, str) and "\0" in value:
        raise ValueError("contains a NUL byte")
    if t is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{value!r} is not a boolean" + (" (use on or off)" if text else
                                                          " (use true or false)"))
    if t is Size:
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return Size(parse_size(value))
        raise ValueError(f"{value!r} is not a size (use e.g. 64M or 1G)")
    if isinstance(t, type) and issubclass(t, enum.Enum):
        if isinstance(value, str):
            for m in t:
                if m.value == value:
                    return m
        choices = ", ".join(str(m.value) for m in t)
        raise ValueError(f"{value!r} is not one of {choices}")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ValueError(f"{value!r} is not a whole number")
    if t is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            x = float(value)
        elif text and isinstance(value, str):
            try:
                x = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        else:
            raise ValueError(f"{value!r} is not a number")
        if not math.isfinite(x):
            raise ValueError(f"{value!r} is not a finite number")
        return x
    if t is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{value!r} is not a string")
    raise TypeError(f"config field {f.name}: unsupported type {t!r}")  # a pyvmm bug


def build(cls: type[T], raw: Mapping[str, Any], where: str, *, text: bool = False,
          ignore: Iterable[str] = ()) -> T:
    """``cls`` from a mapping of its keys; ``text`` says the values are command-line
    strings. Unknown keys, missing required ones and bad values are ConfigErrors;
    then the class's own ``check()`` (if any) may raise ValueError for cross-field
    rules, reported the same way."""
    fields = {f.key: f for f in fields_of(cls)}
    skip = set(ignore)
    for key in raw:
        if key not in fields and key not in skip:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, fields)}")
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key not in raw:
            if f.required:
                raise ConfigError(f"{where}: {key} is required")
            continue
        try:
            kwargs[f.name] = convert(f, raw[key], text)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return obj


def parse_kv(text: str, positional: str | None = None,
             where: str = "option") -> dict[str, str | list[str]]:
    """``key=value[,key=value]``; ``,,`` is a literal comma; a part without ``=`` sets
    ``positional`` (``--disk IMG``, ``--console socket:PATH``). A key given more than
    once collects a list (for list fields; any other field refuses it)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str | list[str]] = {}
    for part in parts:
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if positional is None or positional in out:
                raise ConfigError(f"{where} {text!r}: expected key=value, got {part!r}")
            key, value = positional, part
        key = key.strip()
        prev = out.get(key)
        if prev is None:
            out[key] = value
        elif isinstance(prev, list):
            prev.append(value)
        else:
            out[key] = [prev, value]
    return out


# --- descriptions --------------------------------------------------------------------------
def type_name(f: FieldInfo) -> str:
    t = f.base
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return "|".join(str(m.value) for m in t)
    if typing.get_origin(t) is list:
        return "list of strings (repeat the key)"
    name = {bool: "bool", int: "int", float: "number", str: "string", Size: "size"}.get(t, "?")
    return f"{name} or null" if f.optional and f.default is None and not f.required else name


def default_text(f: FieldInfo) -> str:
    if f.required:
        return "(required)"
    d = f.default
    if isinstance(d, enum.Enum):
        return str(d.value)
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, Size):
        return f"{d >> 20}M" if d % MiB == 0 else str(int(d))
    if d is None:
        return "none"
    if isinstance(d, list):
        return "[]"
    if f.hex and isinstance(d, int):
        return f"{d:#x}"
    if d == "":
        return '""'
    return str(d)


def json_schema(cls: type, *, title: str | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a config dataclass."""
    props: dict[str, Any] = {}
    required = []
    for f in fields_of(cls):
        t = f.base
        s: dict[str, Any]
        if t is bool:
            s = {"type": "boolean"}
        elif t is int:
            s = {"type": "integer"}
        elif t is float:
            s = {"type": "number"}
        elif t is str:
            s = {"type": "string"}
        elif t is Size:
            s = {"anyOf": [{"type": "integer", "minimum": 0},
                           {"type": "string", "pattern": _SIZE_RE.pattern}]}
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            s = {"enum": [m.value for m in t]}
        elif typing.get_origin(t) is list:
            s = {"type": "array", "items": {"type": "string"}}
        else:
            s = {}
        if f.optional and "type" in s:
            s["type"] = [s["type"], "null"]
        elif f.optional:
            s = {"anyOf": [s, {"type": "null"}]}
        if f.doc:
            s["description"] = f.doc
        if not f.required:
            s["default"] = (f.default.value if isinstance(f.default, enum.Enum) else
                            (f.default >> 20 if isinstance(f.default, Size) else f.default))
        props[f.key] = s
        if f.required:
            required.append(f.key)
    for key, s in (extra or {}).items():
        props[key] = s
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if title:
        out["title"] = title
    if required:
        out["required"] = required
    return out
