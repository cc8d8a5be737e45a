"""Prompt lists (``--prompts-file``, :mod:`sa3_mlx.batch`): items checked up front, batched by settings shape,
named per item, resumable, with a manifest."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import batch
from sa3_mlx.audio import read_metadata
from sa3_mlx.batch import BatchError, groups, item_id, load_items, run_items
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.settings import batch_shape, validate

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def read(path) -> np.ndarray:
    return sf.read(str(path), dtype="float32", always_2d=True)[0].T


def test_plain_lines_and_jsonl_items(tmp_path):
    items = load_items(write(tmp_path / "p.txt", ["# a comment", "rain on a tin roof", "", "  (thunder:1.5) far  "]),
                       {"seconds": 4.0, "steps": 2})
    assert [(i.line, i.settings.prompt, i.settings.seconds, i.settings.steps) for i in items] == [
        (2, "rain on a tin roof", 4.0, 2), (4, "(thunder:1.5) far", 4.0, 2)]
    assert items[0].id == item_id(items[0].settings) and len(items[0].id) == 16
    again = load_items(tmp_path / "p.txt", {"seconds": 4.0, "steps": 2})
    assert [i.id for i in again] == [i.id for i in items]  # stable names
    assert load_items(tmp_path / "p.txt", {"seconds": 5.0})[0].id != items[0].id

    (tmp_path / "in.wav").write_bytes(b"")
    items = load_items(write(tmp_path / "p.jsonl", [
        {"id": "rain", "prompt": "rain", "seed": 3, "cfg_interval": [0.1, 0.9], "format": "flac"},
        {"prompt": "thunder", "negative_prompt": "wind", "num_outputs": 2, "init_audio": "in.wav"},
    ]), {"seconds": 2.0})
    assert items[0].id == "rain" and items[0].settings.cfg_interval == (0.1, 0.9) and items[0].settings.seed == 3
    assert items[1].settings.init_audio == str(tmp_path / "in.wav") and items[1].settings.num_outputs == 2


def test_every_bad_line_is_listed_with_its_number(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "fine"}, {"prompt": "x", "seconds": 500}, {"prompt": "y", "bogus": 1}, "not json",
        {"prompt": "z (a:b)"}, {"id": "../x", "prompt": "p"}, {"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"},
        {"prompt": "fine"}, ["a list"], {"seed": 1},
    ])
    with pytest.raises(BatchError) as info:
        load_items(path)
    text = str(info.value)
    assert text.startswith("--prompts-file: 9 bad lines: ")
    for words in (":2: seconds must be in (0, 384] (got 500)", ":3: unknown setting 'bogus'",
                  ":4: not a JSON object (Expecting value, column 1)",
                  ":5: prompt (a:b): the weight 'b' is not a number", ":6: id '../x' must be 1-64 letters",
                  ":8: id a is also line 7's", ":9: id ", "the same settings: give one of them an id or a seed",
                  ":10: not a JSON object of settings", ":11: prompt is required"):
        assert words in text, words
    for missing, message in ((tmp_path / "none.txt", "no such file"), (write(tmp_path / "e.txt", ["# x", ""]),
                                                                         "holds no prompts")):
        with pytest.raises(BatchError, match=message):
            load_items(missing)


def test_groups_share_a_settings_shape_and_a_pipeline(tmp_path):
    (tmp_path / "in.wav").write_bytes(b"")
    items = load_items(write(tmp_path / "p.jsonl", [
        {"prompt": "a", "seed": 1}, {"prompt": "b", "seconds": 9}, {"prompt": "c", "negative_prompt": "n", "seed": 2,
                                                                   "num_outputs": 3},
        {"prompt": "d", "model": "medium"}, {"prompt": "e", "init_audio": "in.wav"}, {"prompt": "f", "seed": 4},
        {"prompt": "g", "num_outputs": 16},
    ]), {"seconds": 3.0})
    found = [[i.settings.prompt for i in g] for g in groups(items)]
    # Same shape (model, length, ...) batched, whatever the prompt, seed and outputs; 16 outputs at most a group;
    # groups of one pipeline run one after another; audio input runs alone.
    assert found == [["a", "c", "f"], ["b"], ["e"], ["g"], ["d"]]
    assert len({batch_shape(items[i].settings) for i in (0, 2, 5)}) == 1


def test_run_items_loads_models_once_batches_and_resumes(tmp_path, bundle):
    made = []

    def make(settings):
        made.append(settings.model_name)
        return Pipeline.from_settings(settings, weights_dir=bundle, progress=False)

    path = write(tmp_path / "p.jsonl", [
        {"id": "one", "prompt": "rain", "seed": 5, "cfg": 3}, {"id": "two", "prompt": "(thunder:1.5) far", "seed": 9,
                                                              "cfg": 3, "negative_prompt": "wind", "num_outputs": 2},
        {"id": "three", "prompt": "pad", "seed": 1, "format": "flac", "seconds": 2},
    ])
    items = load_items(path, {"model": "medium", "seconds": 1.5, "steps": 3})
    out = tmp_path / "out"
    results = list(run_items(items, out, make))
    assert made == ["medium"]
    assert [r.item.id for r in results] == ["one", "two", "three"] and not any(r.skipped for r in results)
    assert [p.name for r in results for p in r.paths] == ["one.wav", "two_1.wav", "two_2.wav", "three.flac"]
    pipe = make(items[0].settings)
    for r in results:
        for i, o in enumerate(r.outputs):
            single = pipe.generate(settings=r.item.settings.replace(seed=r.item.settings.seed + i, num_outputs=1))
            np.testing.assert_allclose(read(o["path"]), np.clip(single.audio[0], -1, 1), atol=1e-4)  # 16-bit WAV
            assert read_metadata(o["path"])["seed"] == r.item.settings.seed + i
            assert read_metadata(o["path"])["item"] == r.item.id
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["id"] for m in manifest] == ["one", "two", "three"]
    assert manifest[1]["settings"]["prompt"] == "(thunder:1.5) far" and manifest[1]["settings"]["num_outputs"] == 2
    assert [o["seed"] for o in manifest[1]["outputs"]] == [9, 10] and "peak_dbfs" in manifest[1]["outputs"][0]
    assert manifest[2]["audio_seconds"] == 2.0 and manifest[0]["line"] == 1

    # Resumable: what exists is skipped; a missing item alone is generated again and appended.
    (out / "one.wav").unlink()
    again = list(run_items(items, out, make))
    assert [(r.item.id, r.skipped) for r in again] == [("one", False), ("two", True), ("three", True)]
    assert [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()] == [
        "one", "two", "three", "one"]
    (out / "two_2.wav").unlink()
    with pytest.raises(batch.output.OutputError, match="two_1.wav already exists but other outputs"):
        list(run_items(items, out, make))


def test_prompts_file_through_the_cli(generate, work):
    write(work / "list.txt", ["rain on a tin roof", "(thunder:1.5) far away"])
    code, out, err = generate("--prompts-file", "list.txt", "--out", "batch", "--seed", "7")
    assert code == 0, err
    lines = out.splitlines()
    items = load_items(work / "list.txt", {"model": "sm-music", "seconds": 1.5, "steps": 2, "seed": 7})
    assert [line.split()[:2] for line in lines] == [["[1/2]", items[0].id], ["[2/2]", items[1].id]]
    assert f"batch/{items[0].id}.wav (seed 7, peak " in lines[0]
    assert read_metadata(work / "batch" / f"{items[1].id}.wav")["prompt"] == "(thunder:1.5) far away"
    code, out, err = generate("--prompts-file", "list.txt", "--out", "batch", "--seed", "7", "--json")
    assert code == 0 and [json.loads(line)["skipped"] for line in out.splitlines()] == [True, True]
    assert len((work / "batch" / "manifest.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, words", [
    (["--prompts-file", "missing.txt"], "--prompts-file missing.txt: no such file"),
    (["--prompts-file", "bad.jsonl"], "--prompts-file: 1 bad line: bad.jsonl:2: cfg must be in [0, 50] (got 99)"),
    (["--prompts-file", "bad.jsonl", "--prompt", "x"], "leave out --prompt"),
    (["--prompts-file", "bad.jsonl", "--seconds", "0"], "--seconds must be in (0, 384]"),
    (["--prompts-file", "bad.jsonl", "--out", "bad.jsonl"], "--out is the folder"),
])
def test_prompts_file_errors_are_one_line(generate, work, args, words):
    write(work / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "no", "cfg": 99}])
    code, out, err = generate(*args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0]
    assert not (work / "output").exists()


def test_the_batch_package_imports_no_front_end():
    for path in (REPO / "sa3_mlx" / "batch").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.split(".")[-1] in ("cli", "studio") or ".cli" in n or ".studio" in n
                    or n.startswith(("cli", "studio"))], (path, names)
    assert validate({"prompt": "x"}).format is None


def test_a_prompt_seen_before_needs_no_text_encoder(bundle):
    """The prompt embeddings are kept (LRU): seeds of one prompt (a batch's --vary seed, the studio's next
    variation) skip the text encoder and its load, even after free_models dropped it, with equal results."""
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    first = pipe.generate("rain on a tin roof", seconds=1.5, steps=2, seed=3, cfg=3, negative_prompt="wind",
                          free_models=True)
    assert "load text encoder" in [s.name for s in first.stages] and pipe._text is None
    again = pipe.generate("rain on a tin roof", seconds=1.5, steps=2, seed=3, cfg=3, negative_prompt="wind",
                          free_models=True)
    assert "load text encoder" not in [s.name for s in again.stages] and pipe._text is None
    np.testing.assert_array_equal(again.audio, first.audio)
    many = pipe.generate_many([validate({"prompt": "rain on a tin roof", "seconds": 1.5, "steps": 2, "seed": k,
                                         "cfg": 3, "negative_prompt": "wind"}) for k in (3, 4)])
    assert "load text encoder" not in [s.name for s in many[0].stages]
    np.testing.assert_allclose(many[0].audio, first.audio, atol=1e-4)
    # Another negative prompt is another key; the cache keeps at most text_cache_entries.
    pipe.text_cache_entries = 2
    for k in range(3):
        pipe.generate(f"p{k}", seconds=1.5, steps=2, seed=1)
    assert len(pipe._text_cache) == 2 and not pipe.text_cached("rain on a tin roof", "wind", guidance_on())


def guidance_on():
    from sa3_mlx.sampling import Guidance

    return Guidance(scale=3.0)
