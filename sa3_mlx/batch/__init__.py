"""Lists of generations: ``sa3 --prompts-file FILE`` (one process) and ``sa3 batch FILE`` (one machine, or the
workers of a Ray cluster).

* :mod:`.items` -- prompts files (plain text, JSONL, CSV) read and checked up front, ``--vary`` expansions,
  stable item names, grouping by settings shape;
* :mod:`.render` -- a group of items generated and written by one process with its loaded models;
* :mod:`.manifest` -- ``manifest.jsonl``: what is done, so that a run resumes where it stopped;
* :mod:`.schedule` -- the driver of ``sa3 batch``: workers, retries, stopping; in-process executor;
* :mod:`.cluster` -- the Ray executor (optional dependency);
* :mod:`.command` -- ``sa3 batch``'s own command line (batch is a front end: nothing here imports the CLI or
  the studio).

:func:`run_items` is ``--prompts-file``'s loop: items whose outputs all exist are skipped, each written item
appends its line to the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import output
from ..settings import GenerationSettings
from .items import (
    MANIFEST,
    MAX_ROWS,
    BatchError,
    Item,
    groups,
    item_id,
    load_items,
    output_paths,
    parse_lines,
    parse_vary,
    pipeline_key,
    read_items,
)
from .manifest import Manifest, settings_key
from .render import Renderer


@dataclass
class ItemResult:
    item: Item
    paths: list[Path]
    skipped: bool = False  # every output already existed
    settings: GenerationSettings | None = None  # as run (seed drawn, model defaults filled)
    outputs: list[dict] = field(default_factory=list)  # path, seed and levels per output
    wall_seconds: float = 0.0  # this item's share of its group's run
    warnings: list[str] = field(default_factory=list)


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
    renderer = Renderer(make_pipeline)
    record = Manifest(folder, manifest) if manifest else None
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
                todo.append(item)
        if todo:
            given = {item.id: item for item in todo}  # as given: the seed a renderer drew is not in its key
            for rendered in renderer.render(todo, folder, overwrite):
                item = given[rendered.item.id]
                if record is not None:
                    record.append(rendered.entry(key=settings_key(item)))
                done_in_order[item.id] = ItemResult(
                    item, rendered.paths, settings=rendered.settings, outputs=rendered.outputs,
                    wall_seconds=rendered.wall_seconds, warnings=rendered.warnings)
        for item in group:  # in the file's order
            yield done_in_order[item.id]


__all__ = ["BatchError", "Item", "ItemResult", "MANIFEST", "parse_lines", "parse_vary", "load_items", "read_items",
           "item_id", "groups", "output_paths", "pipeline_key", "run_items"]
