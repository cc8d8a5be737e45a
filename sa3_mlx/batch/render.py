"""Rendering a group of items into files: what one process does with its loaded models, whether it is
``sa3 --prompts-file``, ``sa3 batch`` on one machine, or a worker of a Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import output
from ..audio import SAMPLE_RATE, read_audio
from ..settings import GenerationSettings, draw_seed
from .items import Item, format_of, output_paths, pipeline_key


@dataclass
class Rendered:
    """One written item: what the manifest records of it."""

    item: Item
    paths: list[Path]
    settings: GenerationSettings  # as run (seed drawn, model defaults filled)
    outputs: list[dict]  # path, seed, bytes and levels per output
    metadata: dict  # the settings that reproduce it (as its files record them)
    audio_seconds: float
    wall_seconds: float  # this item's share of its group's run, and its own writing
    warnings: list[str] = field(default_factory=list)

    def entry(self, **extra) -> dict:
        """The manifest line of this item."""
        return dict(id=self.item.id, line=self.item.line, status="done", settings=self.metadata,
                    outputs=self.outputs, audio_seconds=round(self.audio_seconds, 4),
                    wall_seconds=round(self.wall_seconds, 4), **extra)


def with_seeds(items: Sequence[Item]) -> list[Item]:
    """The items with a seed drawn for those that have none: drawn once, so that a retry (or another
    worker) makes the same audio."""
    return [item if item.settings.seed is not None else
            Item(item.id, item.line, item.settings.replace(seed=draw_seed())) for item in items]


class Renderer:
    """Holds one loaded pipeline (``make_pipeline(settings)`` makes it) and renders groups of items
    (:func:`~sa3_mlx.batch.items.groups`) into a folder. Consecutive groups with the same
    :func:`pipeline_key` share the loaded models; another key frees them before the next load."""

    def __init__(self, make_pipeline: Callable[[GenerationSettings], Any]):
        self.make_pipeline = make_pipeline
        self.pipeline = None
        self.key: tuple | None = None
        self.loads = 0

    def pipeline_for(self, settings: GenerationSettings):
        key = pipeline_key(settings)
        if self.pipeline is None or key != self.key:
            self.pipeline = self.key = None  # the previous models go before the next load
            self.pipeline, self.key = self.make_pipeline(settings), key
            self.loads += 1
        return self.pipeline

    def render(self, group: Sequence[Item], folder: str | Path, overwrite: bool = False) -> list[Rendered]:
        """Generate one group (items of one pipeline and settings shape, or one item with audio input) and
        write each item's outputs, all or none per item. ``overwrite``: replace files already there
        (``sa3 batch`` does for items its manifest does not record as done)."""
        folder = Path(folder)
        group = with_seeds(group)
        todo = [(item, output_paths(item, folder)) for item in group]
        for _, paths in todo:
            output.check_paths(paths)
        pipe = self.pipeline_for(group[0].settings)
        runs = [item.settings.replace(free_models=False) for item in group]
        started = time.perf_counter()
        if len(runs) == 1 and runs[0].init_audio is not None:
            results = [pipe.generate(settings=runs[0], init_audio=read_audio(runs[0].init_audio))]
        else:
            results = pipe.generate_many(runs)
        share = (time.perf_counter() - started) / len(todo)
        done = []
        for (item, paths), result in zip(todo, results):
            fmt = format_of(item.settings)
            t0 = time.perf_counter()
            written = output.write(result, paths, fmt, item.settings.loudness, overwrite, item=item.id)
            outputs = [dict(path=str(o.path), seed=o.seed, bytes=o.path.stat().st_size, **o.levels)
                       for o in written.outputs]
            metadata = output.metadata(result, 0, fmt) | {"num_outputs": result.settings.num_outputs,
                                                          "seed": result.settings.seed}
            done.append(Rendered(item, paths, result.settings, outputs, metadata,
                                 result.audio.shape[-1] / SAMPLE_RATE * len(outputs),
                                 share + time.perf_counter() - t0, written.warnings))
        return done


__all__ = ["Rendered", "Renderer", "with_seeds"]


def problems(items: Sequence[Item], folder: str | Path, weights_dir: str | Path | None = None) -> list[str]:
    """What would stop ``items`` here, found before anything runs: model files that are not local (see
    :func:`sa3_mlx.sources.missing_files`), LoRA files and audio inputs that cannot be read, an output
    folder that cannot take files. Each node of a cluster runs this for itself."""
    import os

    from ..settings import parse_lora_spec
    from ..sources import missing_files

    found: list[str] = []
    runs: dict[tuple, bool] = {}
    for item in items:
        s = item.settings
        key = (s.model_name, s.decoder)
        runs[key] = runs.get(key, False) or s.init_audio is not None
    for (model, decoder), encoder in runs.items():
        found += missing_files(model, decoder, weights_dir, encoder)
    paths = sorted({parse_lora_spec(spec)[0] for item in items for spec in item.settings.loras}
                   | {item.settings.init_audio for item in items if item.settings.init_audio is not None})
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            found.append(f"{path} (no such file here)" if not os.path.exists(path) else f"{path} (cannot be read)")
    folder = Path(folder)
    probe = folder if folder.is_dir() else next((p for p in folder.parents if p.exists()), None)
    if probe is None or not os.access(probe, os.W_OK | os.X_OK):
        found.append(f"{folder} (cannot be written)")
    return list(dict.fromkeys(found))
