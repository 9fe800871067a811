"""Typed configuration dataclasses: every value, from a YAML file, the command line or Python,
is converted to its field's declared type, and every error names the key and the value.

Conversion rules (``coerce``), by the field's annotation (``X | None`` also accepts null):

* ``float``: a number, or text that Python's ``float`` reads (``1e-5``, ``3``, ``0.5``); NaN
  and infinities are refused (no field of a training config means them);
* ``int``: a whole number only (``7``, ``7.0``, ``1e3``); ``2.5`` or ``abc`` is an error;
* ``bool``: true/false, yes/no, on/off, 1/0 (any case); nothing else;
* ``str``: text is kept as it is (``--mixed_precision no`` stays ``"no"``); a number or a
  boolean where text is expected is an error (quote it in YAML), paths become text;
* ``dict``: a mapping (on the command line, a YAML mapping such as ``{a: 1}``).

YAML files are read with the YAML 1.2 core rules for booleans and numbers (``yaml_load``):
PyYAML follows YAML 1.1, where ``1e-5`` is a *string* (a float needs a dot) and ``no``/``off``
are booleans, the two traps of the paper's values (``lambda_llm: 1e-5``) and of
``mixed_precision: no``.

A config class (``TypedConfig``, e.g. ``sur_lib.train.TrainConfig``) is its field list plus a
table of rules, ``RULES`` = {field: ``Rule``}: a range (``ge``/``gt``/``le``/``lt``, with the
reason for an upper bound), choices, text that must not be empty, a path (``~`` expanded), a
seed. ``check_fields`` applies the table on creation; the class's ``check()`` holds the few
rules between fields. Unknown keys are refused with the closest valid one (``check_known``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .cli import UsageError

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NULL = ("null", "none", "~")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans (true/false only) and floats (1e-5)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
# an integer literal must stay an int: the int resolver (kept above) is tried first for digits
for _ch in "-+0123456789":
    _Yaml12Loader.yaml_implicit_resolvers[_ch].sort(key=lambda tr: tr[0] != "tag:yaml.org,2002:int")


def _construct_mapping(self, node, deep=False):
    """SafeLoader's mapping, refusing a key written twice in one mapping (PyYAML keeps the last
    silently). Keys brought in by a merge (``<<: *base``) may be overridden, as YAML intends."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r} (first on line {seen[key_node.value]}); "
                    "each key may appear once", key_node.start_mark)
            seen[key_node.value] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(self, node, deep=deep)


_Yaml12Loader.construct_mapping = _construct_mapping

#: Bounds of a YAML document: its size in characters, and the number of values it expands to
#: once every alias (``*name``) is replaced by its anchor's value (an "alias bomb" of a few
#: lines expands to billions and would hang whatever walks it).
MAX_YAML_CHARS = 1_000_000
MAX_YAML_VALUES = 100_000


def _expanded_size(node, memo: dict, depth: int = 0) -> int:
    """How many values ``node`` stands for with every alias expanded (shared nodes counted
    each time they are referenced, as a reader of the loaded data would meet them)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if depth > 1000:
        raise UsageError("nested more than 1000 levels deep")
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1)
                       for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo, depth + 1) for v in node.value)
    else:
        size = 1
    memo[key] = min(size, 10 * MAX_YAML_VALUES)  # saturate: the exact count of a bomb is not needed
    return memo[key]


def yaml_load(text: str, source: str = "<text>"):
    """Parse YAML text with the YAML 1.2 booleans and floats (see the module docstring).
    Refused (naming ``source``): a key twice in one mapping, a text over ``MAX_YAML_CHARS``
    characters, a document that expands to over ``MAX_YAML_VALUES`` values."""
    if len(text) > MAX_YAML_CHARS:
        raise UsageError(f"{source}: {len(text):,} characters, more than a config may hold "
                         f"({MAX_YAML_CHARS:,})")
    try:
        loader = _Yaml12Loader(text)  # noqa: S506 - a SafeLoader subclass
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            try:
                size = _expanded_size(node, {})
            except UsageError as e:
                raise UsageError(f"{source}: {e}") from None
            if size > MAX_YAML_VALUES:
                raise UsageError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES:,} values "
                                 "once its aliases (*name) are replaced (an alias bomb?); refused")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{source}{where}: not valid YAML ({problem})") from None


def load_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file that must hold a mapping (``key: value`` lines); an empty file gives {}."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the config file {path}: {e}") from None
    values = yaml_load(text, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a config file must be a mapping of `key: value` lines, "
                         f"got a {_kind(values)}")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise UsageError(f"{path}: config keys must be names, got {bad!r}")
    return values


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _kind(value) -> str:
    return _short(_kind_full(value))


def _kind_full(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    return type(value).__name__ if not isinstance(value, (list, tuple)) else f"list {list(value)!r}"


def _split_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def coerce(key: str, value, tp, text: bool = False):
    """``value`` as type ``tp`` (see the module docstring). ``text``: the value is command-line
    text (so ``null``/``none`` mean None for optional fields and dicts are parsed as YAML)."""
    base, optional = _split_optional(tp)
    if isinstance(value, str) and text and optional and value.strip().lower() in NULL:
        return None
    if value is None:
        if optional:
            return None
        raise UsageError(f"{key}: a value is required (got null)")
    base = typing.get_origin(base) or base

    def fail(expected: str, hint: str = ""):
        return UsageError(f"{key}: expected {expected}, got the {_kind(value)}{hint}")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise fail("true or false")
    if base is int:
        if isinstance(value, bool):
            raise fail("a whole number")
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            s = value.strip().replace("_", "")
            try:
                return int(s)
            except ValueError:
                try:
                    number = float(s)
                except ValueError:
                    raise fail("a whole number") from None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise fail("a whole number")
    if base is float:
        if isinstance(value, bool):
            raise fail("a number")
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise fail("a number") from None
        if not isinstance(number, (int, float)):
            raise fail("a number")
        if not math.isfinite(number):
            raise fail("a finite number")
        return float(number)
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        hint = " (quote it in YAML to make it text)" if isinstance(value, (bool, int, float)) else ""
        raise fail("text", hint)
    if base is dict:
        if isinstance(value, str) and text:
            value = yaml_load(value, key)
            if value is None:
                return {}
        if isinstance(value, dict):
            return dict(value)
        raise fail("a mapping")
    return value  # an annotation this loader does not know: left as given


def field_types(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce_fields(obj) -> None:
    """Convert every field of a dataclass instance in place (call it in ``__post_init__``)."""
    for name, tp in field_types(type(obj)).items():
        object.__setattr__(obj, name, coerce(name, getattr(obj, name), tp))


def check_known(cls, keys, source: str = "config") -> None:
    """Raise a UsageError naming unknown keys (with the closest valid one)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in keys if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"unknown {source} keys: {', '.join(hints)}; valid keys: {sorted(names)}")


def parse_overrides(cls, argv: Sequence[str]) -> dict:
    """``--key value`` (or ``--key=value``) pairs, each converted to the field's type; dashes in
    keys become underscores. Errors name the argument."""
    pairs = split_pairs(argv)
    check_known(cls, [k for k, _ in pairs], "command-line")
    types_ = field_types(cls)
    return {k: coerce(f"--{k}", v, types_[k], text=True) for k, v in pairs}


def split_pairs(argv: Sequence[str]) -> list[tuple[str, str]]:
    """[(key, text)] from ``--key value`` / ``--key=value`` arguments."""
    out, i, argv = [], 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UsageError(f"expected --key value pairs after the config file, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value (--key value)")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key.replace("-", "_"), value))
    return out


#: The largest seed any generator of this project takes (torch's and numpy's take 64-bit seeds,
#: some code adds offsets to them): seeds are whole numbers in [0, MAX_SEED].
MAX_SEED = 2**63 - 1


def check_seed(key: str, value) -> None:
    """A UsageError naming ``key`` unless ``value`` is a whole number in [0, MAX_SEED]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        shown = _short(repr(value), 60)
        raise UsageError(f"{key} must be a whole number from 0 to 2**63 - 1, got {shown}")


def expand_user(value):
    """``~`` or ``~user`` at the start of a path expanded (as a shell does); other values kept."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def check_range(key: str, value, *, gt=None, ge=None, lt=None, le=None, choices=None) -> None:
    """Raise a UsageError naming ``key`` unless ``value`` is in range / one of ``choices``
    (None passes: optional fields are checked only when set)."""
    if value is None:
        return
    if choices is not None and value not in choices:
        raise UsageError(f"{key} must be one of {tuple(choices)}, got {value!r}")
    for bound, ok, word in ((gt, lambda b: value > b, ">"), (ge, lambda b: value >= b, ">="),
                            (lt, lambda b: value < b, "<"), (le, lambda b: value <= b, "<=")):
        if bound is not None and not ok(bound):
            raise UsageError(f"{key} must be {word} {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """How :func:`check_fields` checks one field; an optional field passes while None.

    * ``gt``/``ge``/``lt``/``le``: a range (``check_range``'s errors); ``why``: the reason for
      the upper bound ``le`` (the error then shows it, with thousands separators);
    * ``choices``: the allowed values; ``shown``: how they read in the error (default the tuple);
    * ``text``: text that must not be empty; ``path``: a file or folder, where a leading ``~``
      is the home folder (as in a shell, not a folder named ~); ``seed``: ``check_seed``.
    """
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    why: str | None = None
    choices: tuple | None = None
    shown: str | None = None
    text: bool = False
    path: bool = False
    seed: bool = False


def check_fields(obj, rules: dict[str, Rule]) -> None:
    """Apply ``rules`` ({field: :class:`Rule`}) to a dataclass instance, in the table's order:
    first every path's ``~`` is expanded (in place), then each field is checked; the first
    failure raises a UsageError that names the key and the value."""
    for name, rule in rules.items():
        if rule.path:
            object.__setattr__(obj, name, expand_user(getattr(obj, name)))
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        if rule.seed:
            check_seed(name, value)
        if rule.text and not value.strip():
            raise UsageError(f"{name} must not be empty")
        if rule.shown is not None and value not in rule.choices:
            raise UsageError(f"{name} must be {rule.shown}, got {value!r}")
        check_range(name, value, gt=rule.gt, ge=rule.ge, lt=rule.lt, le=None if rule.why else rule.le,
                    choices=rule.choices)
        if rule.why is not None and value > rule.le:
            raise UsageError(f"{name} must be <= {rule.le:,}, got {value:,} ({rule.why})")


class TypedConfig:
    """Base of a config dataclass: on creation every field is converted to its declared type
    (:func:`coerce_fields`), checked by the class's ``RULES`` ({field: :class:`Rule`},
    :func:`check_fields`), then by its ``check()`` (rules between fields). Read from a YAML file
    or a dict (unknown keys are refused, naming the closest valid one), written as a dict."""
    RULES: typing.ClassVar[dict] = {}  # a subclass sets its own (a class attribute, not a field)

    def __post_init__(self):
        coerce_fields(self)
        check_fields(self, self.RULES)
        self.check()

    def check(self) -> None:
        """The rules between fields (a subclass's); a failure raises a UsageError."""

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides):
        """A YAML file (a mapping; YAML 1.2 numbers and booleans, so ``1e-5`` is a float and
        ``no`` is text) plus ``overrides``."""
        values = load_yaml_mapping(path)
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise UsageError(f"a config must be a mapping of key: value, got {type(values).__name__}")
        check_known(cls, values, "config")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """{field: its default} (a fresh copy of a mutable one)."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}


def command_line(cls, argv: Sequence[str], doc: str, flags: dict[str, str] | None = None):
    """The command line of a config-driven command, ``CONFIG.yaml [--key value ...]``: the config
    (a ``TypedConfig`` subclass ``cls``) read from the YAML file with the ``--key value``
    overrides (``parse_overrides``), and the values of ``flags`` ({name: help}: boolean options
    of the command that are not config keys, ``--name true``; False when absent). Returns
    (config, {flag: bool}), or None after printing the help (``doc``, the keys, the flags) for
    no arguments, ``-h`` or ``--help``."""
    flags = flags or {}
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        print("keys:", ", ".join(f.name for f in dataclasses.fields(cls)))
        for name, text in flags.items():
            print(f"--{name} true: {text}")
        return None
    pairs = split_pairs(argv[1:])
    values = {}
    for name in flags:
        given = [v for k, v in pairs if k == name]
        values[name] = bool(given) and coerce(f"--{name}", given[-1], bool, text=True)
    rest = [x for k, v in pairs if k not in flags for x in (f"--{k}", v)]
    return cls.from_yaml(argv[0], **parse_overrides(cls, rest)), values
