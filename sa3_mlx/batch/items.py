"""The items of a batch: prompts files read, checked, named and grouped.

* :func:`load_items` reads a prompts file, one item a line: plain text (each non-blank line a prompt;
  lines starting with ``#`` are comments), JSONL (each line a JSON object of settings, any field of
  the settings table by its API name, plus an optional ``id``) or CSV (a header row naming the columns:
  ``prompt`` and any other setting by its API name, plus ``id``; a cell is spelled as on the command line).
  :func:`expand` multiplies the items by ``--vary`` values (a setting, or a ``{name}`` in the prompts).
  Every line is checked up front, against the same rules as the CLI and the API; every bad line is
  reported with its line number.
* :func:`item_id` names an item: its ``id``, else a stable hash of its settings (seed included when given),
  so its outputs have the same names in every run, on every machine.
* :func:`groups` puts items of one settings shape (:func:`sa3_mlx.settings.batch_shape`) together, each
  group run as one batched sampling (``Pipeline.generate_many``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..audio import FORMATS
from ..settings import (
    FIELD,
    MAX_PROMPT_CHARS,
    GenerationSettings,
    SettingsError,
    api_name,
    batch_shape,
    from_json,
    from_text,
    parse_lora_spec,
    to_metadata,
    validate,
)

MANIFEST = "manifest.jsonl"
MAX_ITEMS = 100_000
MAX_LINE_CHARS = 4 * MAX_PROMPT_CHARS
MAX_ROWS = 16  # outputs sampled together at most (the num_outputs bound)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class BatchError(ValueError):
    """A prompts file that cannot be used; the message lists every bad line with its number."""


@dataclass(frozen=True)
class Item:
    id: str
    line: int  # 1-based line number in the prompts file
    settings: GenerationSettings


def _typed(name: str, value, base_dir: Path):
    """A JSON value of setting ``name`` -> the typed value the settings table takes."""
    f = FIELD[name]
    if f.kind == "audio":  # a path here (the studio's ids mean nothing in a file)
        if not isinstance(value, str) or not value:
            raise SettingsError(name, "{" + name + "} must be the path of an audio file (a string)")
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    if f.kind == "loras":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(name, "{" + name + '} must be a list of "FILE[:STRENGTH]" strings')
        return tuple(absolute_lora(spec, base_dir) for spec in value)
    return from_json(f, value)


def absolute_lora(spec: str, base_dir: Path) -> str:
    """A LoRA spec ``FILE[:STRENGTH][@LO-HI]`` with a relative ``FILE`` made ``base_dir``'s."""
    path, _ = parse_lora_spec(spec)
    if not path or Path(path).expanduser().is_absolute():
        return spec
    return str(base_dir / path) + spec[len(path):]


def item_id(settings: GenerationSettings) -> str:
    """A stable name for an item without an ``id``: the hash of its settings as given."""
    text = json.dumps(to_metadata(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_lines(text: str, jsonl: bool | None = None) -> list[tuple[int, dict | BatchError]]:
    """The items of a prompts file's text as ``(line number, JSON values)``: a plain line is
    ``{"prompt": LINE}``; a JSONL line is its object (``jsonl`` None: JSONL when the first item starts with
    ``{``). A line that is no JSON object, or whose ``id`` is malformed, comes as its :class:`BatchError`.
    Blank lines and lines starting with ``#`` are skipped. No setting is checked here (the front end's rules do)."""
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise BatchError("holds no prompts")
    if len(lines) > MAX_ITEMS:
        raise BatchError(f"{len(lines)} items; at most {MAX_ITEMS} are accepted")
    if jsonl is None:
        jsonl = lines[0][1].startswith("{")
    out: list[tuple[int, dict | BatchError]] = []
    for number, line in lines:
        if len(line) > MAX_LINE_CHARS:
            out.append((number, BatchError(f"is {len(line)} characters; at most {MAX_LINE_CHARS} are accepted")))
            continue
        if not jsonl:
            out.append((number, {"prompt": line}))
            continue
        try:
            data = json.loads(line)
        except (ValueError, RecursionError) as e:
            detail = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            out.append((number, BatchError(f"not a JSON object ({detail})")))
            continue
        if not isinstance(data, dict):
            out.append((number, BatchError("not a JSON object of settings")))
            continue
        given_id = data.get("id")
        if given_id is not None and (not isinstance(given_id, str) or not ID_PATTERN.fullmatch(given_id)):
            out.append((number, BatchError(f"id {given_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                                           "(starting with a letter or digit)")))
            continue
        out.append((number, data))
    return out


def _typed_text(name: str, text: str, base_dir: Path):
    """A CSV cell or a ``--vary`` value of setting ``name`` (spelled as on the command line) -> its typed value.
    Repeatable settings take several values separated by ``;`` (``4,6;12,14``)."""
    f = FIELD[name]
    if f.kind == "audio":
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    if f.kind == "bool":
        word = text.strip().lower()
        if word not in ("true", "false", "yes", "no", "1", "0"):
            raise SettingsError(name, "{" + name + f"}} must be true or false (got {text!r})")
        return word in ("true", "yes", "1")
    if f.kind == "choice":
        return text.strip()
    if f.kind == "loras":
        return tuple(absolute_lora(spec, base_dir) for spec in
                     from_text(f, [part.strip() for part in text.split(";") if part.strip()]))
    if f.kind == "ranges":
        return from_text(f, [part.strip() for part in text.split(";") if part.strip()])
    return from_text(f, text.strip())


def parse_csv(text: str) -> list[tuple[int, dict | BatchError]]:
    """The rows of a CSV prompts file as ``(line number, {column: cell})``, empty cells left out; the header
    must name a ``prompt`` column, and every column must be ``id`` or a setting."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise BatchError("holds no prompts") from None
    except csv.Error as e:
        raise BatchError(f"line 1: not CSV ({e})") from None
    header = [h.strip() for h in header]
    unknown = [h for h in header if h != "id" and h not in FIELD]
    if unknown:
        raise BatchError(f"unknown column {unknown[0]!r} in the header (known: id, {', '.join(FIELD)})")
    if "prompt" not in header:
        raise BatchError("the header row has no prompt column")
    if len(set(header)) != len(header):
        raise BatchError("the header row names a column twice")
    rows: list[tuple[int, dict | BatchError]] = []
    while True:
        number = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((number, BatchError(f"not CSV ({e})")))
            break
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if len(rows) >= MAX_ITEMS:
            raise BatchError(f"more than {MAX_ITEMS} items; at most {MAX_ITEMS} are accepted")
        if len(cells) != len(header):
            rows.append((number, BatchError(f"{len(cells)} cells; the header has {len(header)} columns")))
            continue
        if sum(len(c) for c in cells) > MAX_LINE_CHARS:
            rows.append((number, BatchError(f"is longer than {MAX_LINE_CHARS} characters")))
            continue
        row = {h: c for h, c in zip(header, cells) if c.strip()}
        given_id = row.get("id")
        if given_id is not None and not ID_PATTERN.fullmatch(given_id.strip()):
            rows.append((number, BatchError(f"id {given_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                                            "(starting with a letter or digit)")))
            continue
        rows.append((number, row))
    if not rows:
        raise BatchError("holds no prompts")
    return rows


@dataclass(frozen=True)
class Vary:
    """``--vary NAME=VALUES``: every item once per value. ``NAME`` is a setting (``seed=1..50``,
    ``cfg=1,3,5``) or a ``{NAME}`` placeholder in the prompts (``surface=gravel,wood,snow``)."""

    name: str
    values: tuple[str, ...]

    @property
    def is_setting(self) -> bool:
        return self.name in FIELD


MAX_VARY_VALUES = 10_000


def parse_vary(text: str) -> Vary:
    """``NAME=A..B`` (whole numbers, both ends included) or ``NAME=V1,V2,...``; a :class:`BatchError` otherwise."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", name) or not spec.strip():
        raise BatchError(f"--vary {text}: give NAME=A..B or NAME=V1,V2,... (NAME a setting or a {{NAME}} "
                         "placeholder of the prompts)")
    if name == "id":
        raise BatchError(f"--vary {text}: an item's id cannot vary (each variant is named after it)")
    m = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*", spec)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise BatchError(f"--vary {text}: the range {a}..{b} is empty (its end is below its start)")
        if b - a + 1 > MAX_VARY_VALUES:
            raise BatchError(f"--vary {text}: {b - a + 1} values; at most {MAX_VARY_VALUES} are accepted")
        values = tuple(str(v) for v in range(a, b + 1))
    else:
        values = tuple(v.strip() for v in spec.split(","))
        if not all(values):
            raise BatchError(f"--vary {text}: an empty value (values are separated by commas)")
        if len(values) > MAX_VARY_VALUES:
            raise BatchError(f"--vary {text}: {len(values)} values; at most {MAX_VARY_VALUES} are accepted")
        if len(set(values)) != len(values):
            raise BatchError(f"--vary {text}: a value is given twice")
    return Vary(name, values)


def _variant_suffix(choices: Sequence[tuple[Vary, str]]) -> str:
    return "-".join(f"{v.name}{re.sub(r'[^A-Za-z0-9._]+', '_', value)}" for v, value in choices)


def _variant_id(base: str, choices: Sequence[tuple[Vary, str]]) -> str:
    ident = f"{base}-{_variant_suffix(choices)}" if choices else base
    if len(ident) > 64:  # still one name per variant, still stable
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        ident = f"{base[:51]}-{digest}"
    return ident


def _variants(values: dict, varies: Sequence[Vary], base_dir: Path) -> list[tuple[dict, list[tuple[Vary, str]]]]:
    """The typed values of every variant of one item, with the (vary, value) choices that made each."""
    texts = [k for k in ("prompt", "negative_prompt") if isinstance(values.get(k), str)]
    active = [v for v in varies if v.is_setting or any("{" + v.name + "}" in values[k] for k in texts)]
    out = []
    for combo in itertools.product(*(v.values for v in active)):
        variant = dict(values)
        choices = list(zip(active, combo))
        for vary, value in choices:
            if vary.is_setting:
                variant[vary.name] = _typed_text(vary.name, value, base_dir)
        for vary, value in choices:
            if not vary.is_setting:
                for k in texts:
                    if isinstance(variant.get(k), str):
                        variant[k] = variant[k].replace("{" + vary.name + "}", value)
        out.append((variant, choices))
    return out


def read_items(path: str | Path, defaults: Mapping[str, Any] | None = None, varies: Sequence[Vary] = (),
               label: str = "--prompts-file") -> tuple[list[Item], list[str]]:
    """The good items of a prompts file (see the module) and a message per bad line,
    ``{path}:{line}: {message}``. ``defaults``: typed values (the command line's other flags) that an item's
    own settings override; ``varies``: :func:`parse_vary` expansions (their values override the item's).
    A file that cannot be used at all raises :class:`BatchError`; ``label`` names it in messages."""
    path = Path(path)
    prefix = f"{label} {path}" if label else str(path)
    if not path.is_file():
        raise BatchError(f"{prefix}: no such file" if not path.exists() else f"{prefix}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BatchError(f"{prefix}: not UTF-8 text") from None
    except OSError as e:
        raise BatchError(f"{prefix}: cannot be read ({e.strerror or e})") from None
    spelled_as_text = path.suffix.lower() == ".csv"
    base_dir = path.resolve().parent  # relative paths in the file are the file's (and hold on every worker)
    try:
        lines = parse_csv(text) if spelled_as_text else parse_lines(text, jsonl=path.suffix.lower() == ".jsonl" or None)
    except BatchError as e:
        raise BatchError(f"{prefix}: {e}") from None
    templates = [v for v in varies if not v.is_setting]
    used = set()
    base = {k: v for k, v in (defaults or {}).items() if v is not None}
    items, errors, seen = [], [], {}
    total = 0
    for number, data in lines:
        try:
            if isinstance(data, BatchError):
                raise data
            data = dict(data)
            given_id = data.pop("id", None)
            given_id = given_id.strip() if isinstance(given_id, str) else given_id
            unknown = sorted(set(data) - set(FIELD))
            if unknown:
                raise BatchError(f"unknown setting {unknown[0]!r} (known: id, {', '.join(FIELD)})")
            typed = _typed_text if spelled_as_text else _typed
            values = {name: typed(name, value, base_dir) for name, value in data.items() if value is not None}
            variants = _variants({**base, **values}, varies, base_dir)
            total += len(variants)
            if total > MAX_ITEMS:
                raise BatchError(f"{prefix}: with their --vary variants, more than {MAX_ITEMS} items; at most "
                                 f"{MAX_ITEMS} are accepted")
            for variant, choices in variants:
                used.update(v.name for v, _ in choices if not v.is_setting)
                settings = validate(variant)
                ident = _variant_id(given_id, choices) if given_id else item_id(settings)
                if ident in seen:
                    raise BatchError(f"id {ident} is also line {seen[ident]}'s" + (
                        "" if given_id else " (the same settings: give one of them an id or a seed)"))
                seen[ident] = number
                items.append(Item(ident, number, settings))
        except SettingsError as e:
            errors.append(f"{path}:{number}: {e.message(api_name)}")
        except BatchError as e:
            if total > MAX_ITEMS:
                raise
            errors.append(f"{path}:{number}: {e}")
    for vary in templates:
        if vary.name not in used:
            raise BatchError(f"--vary {vary.name}: no setting is called {vary.name!r} and no prompt holds "
                             f"{{{vary.name}}}")
    return items, errors


def bad_lines_message(errors: Sequence[str], label: str = "--prompts-file") -> str:
    shown = list(errors[:20]) + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
    head = f"{label}: " if label else ""
    return f"{head}{len(errors)} bad line{'s' if len(errors) > 1 else ''}: " + "; ".join(shown)


def load_items(path: str | Path, defaults: Mapping[str, Any] | None = None, varies: Sequence[Vary] = (),
               label: str = "--prompts-file") -> list[Item]:
    """Every item of a prompts file, checked (see :func:`read_items`); a :class:`BatchError` listing every bad
    line, ``{path}:{line}: {message}``, before anything is generated."""
    items, errors = read_items(path, defaults, varies, label)
    if errors:
        raise BatchError(bad_lines_message(errors, label))
    return items


def format_of(settings: GenerationSettings) -> str:
    return settings.format or "wav16"


def output_paths(item: Item, folder: Path) -> list[Path]:
    """``folder/ID.ext``, or ``ID_1.ext``, ``ID_2.ext``, ... for several outputs."""
    suffix = FORMATS[format_of(item.settings)][2]
    n = item.settings.num_outputs
    return [folder / f"{item.id}{suffix}"] if n == 1 else [folder / f"{item.id}_{i + 1}{suffix}" for i in range(n)]


def pipeline_key(settings: GenerationSettings) -> tuple:
    """What the models of a run depend on: items with equal keys share the loaded models."""
    return (settings.model_name, settings.decoder, settings.dit_dtype, settings.codec_dtype, tuple(settings.loras))


def groups(items: Sequence[Item], max_rows: int = MAX_ROWS) -> list[list[Item]]:
    """Items of one pipeline and one settings shape together (at most ``max_rows`` outputs a group), in the
    order of their first items; items with audio input alone."""
    keyed: dict[tuple, list[list[Item]]] = {}
    for item in items:
        s = item.settings
        key = (pipeline_key(s), batch_shape(s)) if s.init_audio is None else ("alone", item.line)
        chunk_list = keyed.setdefault(key, [[]])
        if chunk_list[-1] and sum(i.settings.num_outputs for i in chunk_list[-1]) + s.num_outputs > max_rows:
            chunk_list.append([])
        chunk_list[-1].append(item)
    chunks = sorted((chunk for chunk_list in keyed.values() for chunk in chunk_list), key=lambda c: c[0].line)
    first_seen: dict[tuple, int] = {}
    for chunk in chunks:
        first_seen.setdefault(pipeline_key(chunk[0].settings), len(first_seen))
    return sorted(chunks, key=lambda c: first_seen[pipeline_key(c[0].settings)])


