"""A list of generations run in one process: ``sa3 --prompts-file FILE`` (and, later, a cluster's ``sa3 batch``).

Pure functions of the item settings, so that the same items can be spread over machines:

* :func:`load_items` reads a prompts file, one item a line: plain text (each non-blank line a prompt;
  lines starting with ``#`` are comments) or JSONL (each line a JSON object of settings, any field of
  the settings table by its API name, plus an optional ``id``). Every line is checked up front, against
  the same rules as the CLI and the API; every bad line is reported with its line number.
* :func:`item_id` names an item: its ``id``, else a stable hash of its settings (seed included when given),
  so its outputs have the same names in every run, on every machine.
* :func:`groups` puts items of one settings shape (:func:`sa3_mlx.settings.batch_shape`) together, each
  group run as one batched sampling (``Pipeline.generate_many``).
* :func:`run_items` generates the items and yields one :class:`ItemResult` per item; items whose outputs
  all exist are skipped (resumable), and each written item appends its line to the manifest (JSONL).

Nothing here imports a front end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import output
from ..audio import FORMATS, SAMPLE_RATE, read_audio
from ..settings import (
    FIELD,
    MAX_PROMPT_CHARS,
    GenerationSettings,
    SettingsError,
    api_name,
    batch_shape,
    draw_seed,
    from_json,
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


@dataclass
class ItemResult:
    item: Item
    paths: list[Path]
    skipped: bool = False  # every output already existed
    settings: GenerationSettings | None = None  # as run (seed drawn, model defaults filled)
    outputs: list[dict] = field(default_factory=list)  # path, seed and levels per output
    wall_seconds: float = 0.0  # this item's share of its group's run
    warnings: list[str] = field(default_factory=list)


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
        return tuple(value)
    return from_json(f, value)


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


def load_items(path: str | Path, defaults: Mapping[str, Any] | None = None) -> list[Item]:
    """Every item of a prompts file, checked (see the module). ``defaults``: typed values (the command
    line's other flags) that an item's own settings override. Raises :class:`BatchError` listing every
    bad line, ``{path}:{line}: {message}``, before anything is generated."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"--prompts-file {path}: no such file" if not path.exists() else
                         f"--prompts-file {path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BatchError(f"--prompts-file {path}: not UTF-8 text") from None
    except OSError as e:
        raise BatchError(f"--prompts-file {path}: cannot be read ({e.strerror or e})") from None
    try:
        lines = parse_lines(text, jsonl=path.suffix.lower() == ".jsonl" or None)
    except BatchError as e:
        raise BatchError(f"--prompts-file {path}: {e}") from None
    base = {k: v for k, v in (defaults or {}).items() if v is not None}
    items, errors, seen = [], [], {}
    for number, data in lines:
        try:
            if isinstance(data, BatchError):
                raise data
            given_id = data.pop("id", None)
            unknown = sorted(set(data) - set(FIELD))
            if unknown:
                raise BatchError(f"unknown setting {unknown[0]!r} (known: id, {', '.join(FIELD)})")
            values = {name: _typed(name, value, path.parent) for name, value in data.items() if value is not None}
            settings = validate({**base, **values})
            ident = given_id or item_id(settings)
            if ident in seen:
                raise BatchError(f"id {ident} is also line {seen[ident]}'s" + (
                    "" if given_id else " (the same settings: give one of them an id or a seed)"))
            seen[ident] = number
            items.append(Item(ident, number, settings))
        except SettingsError as e:
            errors.append(f"{path}:{number}: {e.message(api_name)}")
        except BatchError as e:
            errors.append(f"{path}:{number}: {e}")
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise BatchError(f"--prompts-file: {len(errors)} bad line{'s' if len(errors) > 1 else ''}: " + "; ".join(shown))
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


def _append_manifest(path: Path, entry: dict) -> None:
    line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def run_items(
    items: Sequence[Item],
    folder: str | Path,
    make_pipeline: Callable[[GenerationSettings], Any],
    overwrite: bool = False,
    max_rows: int = MAX_ROWS,
    manifest: str | None = MANIFEST,
) -> Iterator[ItemResult]:
    """Generate ``items`` into ``folder`` and yield each one's :class:`ItemResult`, in the order of
    :func:`groups`. ``make_pipeline(settings)`` gives the pipeline for an item's models; one is kept loaded
    while consecutive groups share its :func:`pipeline_key`. Items whose outputs all exist are skipped
    (unless ``overwrite``); each written item's entry (id, line, settings, outputs with seed and levels,
    seconds) is appended to ``folder/manifest`` (JSONL)."""
    folder = Path(folder)
    pipe, pipe_key = None, None
    for group in groups(items, max_rows):
        todo, done_in_order = [], {}
        for item in group:
            paths = output_paths(item, folder)
            if not overwrite and all(p.exists() for p in paths):
                done_in_order[item.id] = ItemResult(item, paths, skipped=True)
            elif not overwrite and any(p.exists() for p in paths):
                existing = next(p for p in paths if p.exists())
                raise output.OutputError(f"{existing} already exists but other outputs of item {item.id} do not "
                                         "(remove it, or pass --overwrite)")
            else:
                output.check_paths(paths)
                todo.append((item, paths))
        if not todo:
            yield from done_in_order.values()
            continue
        key = pipeline_key(todo[0][0].settings)
        if pipe is None or key != pipe_key:
            pipe = pipe_key = None  # the previous models go before the next load
            pipe, pipe_key = make_pipeline(todo[0][0].settings), key
        runs = [item.settings.replace(free_models=False,
                                      seed=draw_seed() if item.settings.seed is None else item.settings.seed)
                for item, _ in todo]
        started = time.perf_counter()
        if len(runs) == 1 and runs[0].init_audio is not None:
            results = [pipe.generate(settings=runs[0], init_audio=read_audio(runs[0].init_audio))]
        else:
            results = pipe.generate_many(runs)
        share = (time.perf_counter() - started) / len(todo)
        for (item, paths), result in zip(todo, results):
            fmt = format_of(item.settings)
            t0 = time.perf_counter()
            written = output.write(result, paths, fmt, item.settings.loudness, overwrite, item=item.id)
            outputs = [dict(path=str(o.path), seed=o.seed, **o.levels) for o in written.outputs]
            done = ItemResult(item, paths, settings=result.settings, outputs=outputs,
                              wall_seconds=share + time.perf_counter() - t0, warnings=written.warnings)
            if manifest:
                _append_manifest(folder / manifest, dict(
                    id=item.id, line=item.line, settings=output.metadata(result, 0, fmt) | {
                        "num_outputs": result.settings.num_outputs, "seed": result.settings.seed},
                    outputs=outputs, audio_seconds=result.audio.shape[-1] / SAMPLE_RATE * len(outputs),
                    wall_seconds=round(done.wall_seconds, 4)))
            done_in_order[item.id] = done
        for item in group:  # in the file's order
            yield done_in_order[item.id]


__all__ = ["BatchError", "Item", "ItemResult", "MANIFEST", "parse_lines", "load_items", "item_id", "groups", "output_paths",
           "pipeline_key", "run_items"]
