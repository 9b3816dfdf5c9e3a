"""The one description of a training data set's options: names, types, defaults, checks and
help, and which front doors read each.

A :class:`Spec` is a dataclass tree — the run's options (model, batch size or pixel budget,
world size, last batch, seed, scan processes, encoder cache) and its :class:`DatasetSpec`
entries (source, column map, repeats, :class:`LadderSpec` overrides or a fitted budget,
:class:`CaptionSpec` template / trigger words / dropout, scan cache). Every field carries
metadata (help, the doors that use it, how a file value is checked, how a command-line flag
parses it), and everything else is derived from it:

- dataset config files (TOML / YAML) parse into a ``Spec`` (``bucketing.pipeline.config``);
- the builders (``text_to_image_dataset``) check their keyword arguments with :func:`check`;
- ``bucket-report`` and ``bucket-cache`` generate their shared options with
  :func:`add_options` and read back what the user gave with :func:`given_options`;
- docs/configs.md's key table is :func:`key_table` (a test keeps the page equal to it).

The doors: ``file`` (a config file, read by ``from_config`` and ``bucket-report --config``),
``builder`` (``text_to_image_dataset``'s keyword arguments), ``report`` (``bucket-report``
flags) and ``cache`` (``bucket-cache`` flags). :class:`ConfigError` is the one error for a
problem a user can fix in any of them, naming the file, the key and the line when there are.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bucketing.ladder import FIT_MODES, MAX_SIDE
from bucketing.models import MODELS

DOORS = ("file", "builder", "report", "cache")
LAST_BATCH = ("short", "pad", "drop")
CROPS = ("random", "center")
ON_ERROR = ("substitute", "raise")
COLUMN_MAP_KEYS = ("image", "caption", "width", "height")
MAX_SIZE = 2**62  # batch sizes and pixel budgets (the sampler's bound)
RENAMED = {"cache": "scan_cache", "workers": "scan_workers"}
"""Older spellings (one release) of the builders', files' and commands' scan options."""


class ConfigError(ValueError):
    """A problem with the options a user gave, naming the file, the key and the line when
    there are (``data.toml:13: datasets[0].captions.dropuot: unknown key; ...``)."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        self.file, self.key, self.line, self.reason = file, key, line, message
        where = f"{file}:{line}" if file and line else file
        text = f"{key}: {message}" if key else message
        super().__init__(f"{where}: {text}" if where else text)


# --------------------------------------------------------------------------- checks


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v}"


def _fraction(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be a number in [0, 1], got {value}"


def _size(value: int) -> str | None:
    if value < 1:
        return f"must be >= 1, got {value}"
    return None if value <= MAX_SIZE else f"must be at most 2**62, got {value}"


def _side(value: int) -> str | None:
    if value < 16:
        return f"must be >= 16, got {value}"
    return None if value <= MAX_SIDE else f"must be at most MAX_SIDE = {MAX_SIDE}, got {value}"


def _columns(value: dict) -> tuple[str, str] | None:
    for key, column in value.items():
        if key not in COLUMN_MAP_KEYS or not isinstance(column, str):
            return str(key), (f"keys are {', '.join(COLUMN_MAP_KEYS)}, each naming a column "
                              f"(a string); got {key!r} = {column!r}")
    return None


def _finite_repeats(value: float) -> str | None:
    if math.isfinite(value) and value > 2**16:
        return f"must be at most {2**16}, got {value}"
    ok = math.isfinite(value) and value >= 0
    return None if ok else f"must be a number in [0, {2**16}], got {value}"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def _nonblank(value: str) -> str | None:
    return None if value.strip() else "must be a non-empty string (a class token, or \"stem\")"


def _positive_list(value: list) -> str | None:
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    return f"must be a list of ints >= 1, got {bad[0]!r}" if bad else None


def positive_int(text: str) -> int:
    """A command-line int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def repeats_arg(text: str) -> float:
    """A command-line number of repeats (above 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of repeats, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected repeats above 0, got {text!r}")
    return value


def area_arg(text: str) -> int:
    """An area in pixels: ``1048576`` or ``1024x1024``."""
    w, sep, h = text.lower().partition("x")
    try:
        value = int(w) * int(h) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an area in pixels such as 1048576 or 1024x1024, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive area, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A command-line number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- the tree

_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)


def opt(default: Any, help: str, doors: tuple[str, ...], types: tuple[type, ...], *,
        kind: str, check: Callable[[Any], str | None] | None = None,
        flag: dict[str, Any] | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A spec field: its default, ``help``, the ``doors`` that read it, the ``types`` a file
    value may have, the ``kind`` the key table shows, a ``check`` of its value (None, a
    message, or a table's key and a message), and ``flag``: argparse keywords of its
    command-line option (for the report and cache doors)."""
    unknown = set(doors) - set(DOORS)
    if unknown:
        raise ValueError(f"unknown doors {sorted(unknown)}")
    metadata = {"help": help, "doors": doors, "types": types, "kind": kind, "check": check,
                "flag": flag or {}}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_ALL = ("file", "builder", "report", "cache")
_RUN = ("file", "report")


@dataclass
class LadderSpec:
    """Overrides of the model's preset ladder, or a ladder fitted to the data."""

    max_area: int | None = opt(
        None, "largest bucket area in pixels (default: the model's)", _ALL, _INT,
        kind="int", check=_at_least(1), flag={"type": area_arg, "metavar": "N"})
    levels: list[int] | None = opt(
        None, "bucket areas, one per resolution level (on the command line: sides, "
        "`--levels 512 768 1024`)", _ALL, (list,), kind="list[int]", check=_positive_list,
        flag={"type": positive_int, "nargs": "+", "metavar": "SIDE"})
    step: int | None = opt(None, "side step between buckets (a multiple of the model's)",
                           ("file", "builder"), _INT, kind="int", check=_at_least(1))
    max_aspect: float | None = opt(None, "widest aspect ratio (w:h or h:w)", ("file", "builder"),
                                   _NUM, kind="float", check=_at_least(1))
    fit: str = opt(
        "data", "how the ladder meets the images: `data` (buckets fitted to them from the "
        "model's whole lattice), `preset` (the model's preset) or `native` (every image its "
        "own size, batch size 1)", _ALL, _STR, kind="str", check=_one_of(FIT_MODES),
        flag={"choices": FIT_MODES})
    max_buckets: int | None = opt(
        None, "with fit `data`: at most K buckets (default: as many as the preset uses on "
        "this data; `BucketLadder.from_data`)", _ALL, _INT, kind="int", check=_at_least(1),
        flag={"type": positive_int, "metavar": "K"})

    def overrides(self) -> dict[str, Any]:
        """The preset overrides given (``BucketLadder.for_model`` keywords)."""
        return {k: getattr(self, k) for k in ("max_area", "levels", "step", "max_aspect")
                if getattr(self, k) is not None}


@dataclass
class CaptionSpec:
    """``CaptionTransform``'s options: template and trigger words, dropout, part shuffles."""

    template: str | None = opt(None, "a string containing `{caption}`", ("file", "builder",
                               "cache"), _STR, kind="str", flag={"metavar": "TEXT"})
    prefix: str = opt("", "text before every caption (trigger words: `\"sks, \"`)",
                      ("file", "builder", "cache"), _STR, kind="str", flag={"metavar": "TEXT"})
    suffix: str = opt("", "text after every caption", ("file", "builder", "cache"), _STR,
                      kind="str", flag={"metavar": "TEXT"})
    dropout: float = opt(0.0, "probability of the empty caption", ("file", "builder"), _NUM,
                         kind="float", check=_fraction)
    shuffle_parts: bool = opt(False, "shuffle the caption's comma-separated parts",
                              ("file", "builder"), _BOOL, kind="bool")
    keep_parts: int = opt(0, "leading parts kept in place (and never dropped)",
                          ("file", "builder"), _INT, kind="int", check=_at_least(0))
    separator: str = opt(",", "the part separator", ("file", "builder"), _STR, kind="str")
    tag_dropout: float = opt(0.0, "probability of dropping each part after the kept ones",
                             ("file", "builder"), _NUM, kind="float", check=_fraction)
    fallback: str | None = opt(
        None, "the caption of an image without one: a class token (`\"dog\"`) or `\"stem\"` "
        "(the file name without its extension)", ("file", "builder"), _STR, kind="str",
        check=_nonblank)

    def given(self) -> dict[str, Any]:
        """The options that differ from the defaults (``CaptionTransform`` keywords)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


@dataclass
class DatasetSpec:
    """One data set of a mix (one ``[[datasets]]`` entry of a config file)."""

    source: str = opt("", "a folder, manifest, URL list or anything `scan` accepts (in a file: "
                      "relative to the file's folder)", _ALL, _STR, kind="str")
    name: str | None = opt(None, "a unique name (default: the source)", ("file",), _STR,
                           kind="str")
    repeats: float = opt(1.0, "times each image appears per epoch (fractional allowed)",
                         ("file", "report"), _NUM, kind="float", check=_finite_repeats,
                         flag={"type": repeats_arg, "metavar": "R"})
    column_map: dict[str, str] | None = opt(None, "manifest column names (image, caption, "
                                            "width, height)", ("file", "builder"), (dict,),
                                            kind="table", check=_columns)
    resolution: int | None = opt(None, "buckets up to resolution² (instead of ladder.max_area)",
                                 ("file",), _INT, kind="int", check=_side)
    ladder: LadderSpec = opt(None, "preset overrides or a fitted budget", ("file", "builder"),
                             (dict,), kind="table", factory=LadderSpec)
    captions: CaptionSpec | None = opt(None, "`CaptionTransform`'s options (none: each "
                                       "image's first caption)", ("file", "builder"), (dict,),
                                       kind="table")
    scan_cache: str | None = opt(
        None, "scan cache file (.parquet): rescans read only what changed (was `cache`)", _ALL,
        _STR, kind="str", flag={"metavar": "PATH"})
    caption_extension: str | None = opt(
        None, "read captions from `<stem><extension>` only, e.g. `\".caption\"`",
        ("file", "builder"), _STR, kind="str")
    crop: str = opt("random", "`\"random\"` or `\"center\"` (default for every dataset at the "
                    "top of a file)", ("file", "builder"), _STR, kind="str", check=_one_of(CROPS))
    flip_p: float = opt(0.0, "horizontal flip probability (default for every dataset at the top "
                        "of a file)", ("file", "builder"), _NUM, kind="float", check=_fraction)
    allow_upscale: bool = opt(False, "give images smaller than every bucket the smallest one "
                              "(default for every dataset at the top of a file)", _ALL, _BOOL,
                              kind="bool", flag={"action": "store_const", "const": True})


@dataclass
class Spec:
    """A run's data: its options and datasets (what a config file says)."""

    model: str = opt("flux", "a model preset: " + ", ".join(f"`{m}`" for m in MODELS),
                     _ALL, _STR, kind="str", check=_one_of(tuple(MODELS)),
                     flag={"choices": sorted(MODELS)})
    batch_size: int | None = opt(
        None, "per-rank batch size (or `max_pixels_per_batch`; default 1 in the report)", _RUN,
        _INT, kind="int", check=_size,
        flag={"type": positive_int, "metavar": "B", "group": "size"})
    max_pixels_per_batch: int | None = opt(
        None, "per-rank pixel budget: each bucket gets floor(P / (w*h)) images", _RUN, _INT,
        kind="int", check=_size, flag={"type": area_arg, "metavar": "P", "group": "size"})
    max_batch_size: int | None = opt(None, "cap on the pixel budget's batch sizes", ("file",),
                                     _INT, kind="int", check=_size)
    world_size: int = opt(
        1, "ranks to plan for (training reads torch.distributed)", ("report",),
        _INT, kind="int", check=_at_least(1), flag={"type": positive_int, "metavar": "W"})
    seed: int = opt(0, "the sampler's and the random crops' seed", _ALL, _INT, kind="int",
                    check=_at_least(0), flag={"type": int, "metavar": "S"})
    shuffle: bool = opt(True, "shuffle rows within buckets and the order of steps", ("file",),
                        _BOOL, kind="bool")
    last_batch: str = opt(
        "short", "each bucket's last partial global step: `short`, `pad` or `drop` "
        "(`drop_last = true` is accepted for `drop`)", _RUN, _STR, kind="str",
        check=_one_of(LAST_BATCH), flag={"choices": LAST_BATCH, "group": "last"})
    tokenizers: str | None = opt(
        None, "the model's checkout folder with tokenizer/ (tokenizer_2/, ...)", _RUN, _STR,
        kind="str", flag={"metavar": "DIR"})
    scan_workers: int | None = opt(
        None, "scan processes (default: all cores; was `workers`)", ("file", "builder", "report",
        "cache"), _INT, kind="int", check=_at_least(0), flag={"type": positive_int,
        "metavar": "N"})
    on_error: str = opt("substitute", "a file failing at training time: `substitute` or `raise`",
                        ("file", "builder"), _STR, kind="str", check=_one_of(ON_ERROR))
    encoder_cache: str | None = opt(
        None, "an encoder cache folder (`bucket-cache --config` writes it, `from_config` reads "
        "it)", ("file", "cache"), _STR, kind="str")
    datasets: list[DatasetSpec] = opt(None, "the `[[datasets]]` entries", ("file",), (list,),
                                      kind="array", factory=list)
    path: str = field(default="", metadata={})  # the file it was read from, if any

    def fit_defaults(self) -> dict[str, Any]:
        """The options a dataset inherits from the top of a file."""
        return {k: getattr(self, k) for k in INHERITED}


INHERITED = ("crop", "flip_p", "allow_upscale")
"""Dataset options a file may also give at the top, as every dataset's default."""


def options(cls: type) -> dict[str, dataclasses.Field]:
    """The option fields of a spec class by name (``path`` is no option)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata}


def check(cls: type, values: Mapping[str, Any], prefix: str = "",
          fail: Callable[[str, str], ConfigError] | None = None,
          known: Mapping[str, dataclasses.Field] | None = None) -> None:
    """Check ``values`` (key -> value) against the fields of ``cls`` (or the ``known``
    ones): known keys, types and each field's check. ``fail(key, message)`` makes the error
    (default: a :class:`ConfigError` naming the key)."""
    fail = fail or (lambda key, message: ConfigError(message, key=key))
    known = options(cls) if known is None else known
    for key, value in values.items():
        name = prefix + key
        f = known.get(key)
        if f is None:
            raise fail(name, f"unknown key; known: {', '.join(known)}")
        if value is None and f.default is None:
            continue
        types = f.metadata["types"]
        ok = isinstance(value, types) or (int in types and isinstance(value, numbers.Integral)
                                          or float in types and isinstance(value, numbers.Real))
        if isinstance(value, bool) and bool not in types or not ok:
            raise fail(name, f"must be {_what(f)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(name, f"must be a finite number, got {value}")
        problem = f.metadata["check"] and f.metadata["check"](value)
        if isinstance(problem, tuple):  # (the table's key at fault, the message)
            raise fail(f"{name}.{problem[0]}", problem[1])
        if problem:
            raise fail(name, problem)


def _what(f: dataclasses.Field) -> str:
    kind = f.metadata["kind"]
    return {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false",
            "table": "a table", "array": "an array of [[datasets]] tables",
            "list[int]": "a list of ints"}[kind]


def renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with the older names (``cache``, ``workers``) moved to their new ones, each
    with a ``DeprecationWarning`` naming ``where``; both spellings at once is an error."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise ConfigError(f"give {new} only ({old} is its older name)", key=old)
            warnings.warn(f"{where}: {old!r} is now {new!r}; the old name will be removed",
                          DeprecationWarning, stacklevel=3)
            out[new] = out.pop(old)
    return out


# --------------------------------------------------------------------------- command lines


def _walk() -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(key path, class, field) of every option, top first, ``[]`` marking the datasets."""
    for name, f in options(Spec).items():
        if name != "datasets":
            yield name, Spec, f
    for name, f in options(DatasetSpec).items():
        if name in ("ladder", "captions"):
            sub = LadderSpec if name == "ladder" else CaptionSpec
            for sub_name, g in options(sub).items():
                yield f"datasets[].{name}.{sub_name}", sub, g
        else:
            yield f"datasets[].{name}", DatasetSpec, f
    yield "datasets", Spec, options(Spec)["datasets"]


def flag_fields(door: str) -> dict[str, dataclasses.Field]:
    """The options a command (``"report"`` or ``"cache"``) takes as flags: option name
    (the last part of its key path) -> field."""
    return {path.rsplit(".", 1)[-1]: f for path, _, f in _walk()
            if door in f.metadata["doors"] and f.metadata["flag"]}


def add_options(parser: argparse.ArgumentParser, door: str,
                choices: Mapping[str, Any] | None = None) -> None:
    """Add the spec's options of ``door`` to ``parser``: ``--kebab-name`` flags with the
    spec's help, each defaulting to None so that what the user gave can be told apart
    (:func:`given_options`); the older scan names as deprecated aliases. ``choices``
    narrows an option's choices for this command (``{"model": encoder_models()}``)."""
    groups: dict[str, Any] = {}
    for name, f in flag_fields(door).items():
        kwargs = {k: v for k, v in f.metadata["flag"].items() if k != "group"}
        if choices and name in choices:
            kwargs["choices"] = tuple(choices[name])
        group = f.metadata["flag"].get("group")
        target = parser
        if group:
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            target = groups[group]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default: {default})" if default not in (None, "", False) else ""
        target.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=_plain(f.metadata["help"]) + shown, **kwargs)
        if name == "last_batch":
            target.add_argument("--drop-last", dest="last_batch", action="store_const",
                                const="drop", help="the same as --last-batch drop")
    for old, new in RENAMED.items():
        if new in flag_fields(door):
            parser.add_argument(f"--{old}", dest=new, action=_Renamed, default=None,
                                **{k: v for k, v in flag_fields(door)[new].metadata["flag"]
                                   .items() if k != "group"},
                                help=f"older name of --{new.replace('_', '-')}")


class _Renamed(argparse.Action):
    """An older flag name: stores the value and warns (``DeprecationWarning``, and a line on
    stderr a user of the command sees)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        message = f"{option_string} is now {new}; the old name will be removed"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        parser._print_message(f"{parser.prog}: warning: {message}\n")  # noqa: SLF001
        setattr(namespace, self.dest, values)


def given_options(args: argparse.Namespace, door: str) -> dict[str, Any]:
    """The spec options the user gave on the command line (name -> value; ``--levels``
    sides become areas)."""
    given = {}
    for name in flag_fields(door):
        value = getattr(args, name, None)
        if value is not None:
            given[name] = [s * s for s in value] if name == "levels" else value
    return given


def fill_defaults(args: argparse.Namespace, door: str) -> argparse.Namespace:
    """``args`` with every option the user did not give set to the spec's default."""
    for name, f in flag_fields(door).items():
        if getattr(args, name, None) is None and f.default is not dataclasses.MISSING:
            setattr(args, name, f.default)
    return args


def _plain(text: str) -> str:
    return text.replace("`", "").replace("%", "%%")


# --------------------------------------------------------------------------- docs


def key_table() -> str:
    """docs/configs.md's table of every key: its path, type, default, doors and meaning."""
    lines = ["| key | type | default | file | builder | bucket-report | bucket-cache | meaning |",
             "|---|---|---|:-:|:-:|:-:|:-:|---|"]
    for path, _, f in _walk():
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = "—"
        else:
            default = "—" if f.default in (None, "") else f"`{_toml(f.default)}`"
        doors = ["✓" if d in f.metadata["doors"] else "" for d in DOORS]
        lines.append(f"| `{path}` | {f.metadata['kind']} | {default} | {' | '.join(doors)} | "
                     f"{f.metadata['help'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- key table: generated from bucketing/pipeline/spec.py by `make docs` -->"
TABLE_END = "<!-- end of the key table -->"


def update_key_table(page: str | os.PathLike) -> bool:
    """Write :func:`key_table` between the markers of the markdown ``page`` (docs/configs.md);
    returns whether the page changed."""
    path = Path(page)
    text = path.read_text(encoding="utf-8")
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"{path} has no {TABLE_START!r} ... {TABLE_END!r} markers")
    new = f"{head}{TABLE_START}\n{key_table()}{TABLE_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
