"""``sa3 batch`` on one machine: items from .txt/.jsonl/.csv with --vary, the driver's retries, lost workers,
stopping and resuming (a scripted executor), and the command end to end on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx.audio import read_metadata
from sa3_mlx.batch import BatchError, load_items, parse_vary, read_items
from sa3_mlx.batch.manifest import Manifest, remove_partial_files
from sa3_mlx.batch.render import Renderer
from sa3_mlx.batch.schedule import Driver, ItemDone, ItemFailed, Outcome, Stopping, WorkerInfo, WorkerLost
from sa3_mlx.pipeline import Pipeline


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def pcm(path) -> np.ndarray:
    return sf.read(str(path), dtype="int16", always_2d=True)[0]


# ---- items: CSV and --vary ---------------------------------------------------------------------


def test_csv_items_and_vary_expansions(tmp_path):
    (tmp_path / "in.wav").write_bytes(b"")
    (tmp_path / "p.csv").write_text(
        "id,prompt,seconds,inpaint,free_models,init_audio\n"
        "steps,footsteps on {surface},3,\"1,2;2.5,3\",yes,in.wav\n"
        ",\"rain, heavy\",,,,\n")
    items = load_items(tmp_path / "p.csv", {"steps": 4}, [parse_vary("surface=gravel,wet wood"), parse_vary("seed=1..2")])
    got = [(i.id, i.settings.prompt, i.settings.seed) for i in items]
    assert got[:4] == [("steps-surfacegravel-seed1", "footsteps on gravel", 1),
                       ("steps-surfacegravel-seed2", "footsteps on gravel", 2),
                       ("steps-surfacewet_wood-seed1", "footsteps on wet wood", 1),
                       ("steps-surfacewet_wood-seed2", "footsteps on wet wood", 2)]
    s = items[0].settings
    assert (s.seconds, s.inpaint, s.free_models, s.init_audio, s.steps) == (
        3.0, ((1.0, 2.0), (2.5, 3.0)), True, str(tmp_path / "in.wav"), 4)
    # The second row has no placeholder: only the setting varies; without an id, names are hashes.
    assert [(i.settings.prompt, i.settings.seed, len(i.id)) for i in items[4:]] == [("rain, heavy", 1, 16),
                                                                                    ("rain, heavy", 2, 16)]
    assert items[4].id != items[5].id


@pytest.mark.parametrize("text, words", [
    ("seed", "give NAME=A..B"), ("seed=5..1", "the range 5..1 is empty"), ("seed=1..20000", "at most 10000"),
    ("x=a,,b", "an empty value"), ("x=a,a", "given twice"), ("id=1..3", "id cannot vary"),
])
def test_bad_vary_values(text, words):
    with pytest.raises(BatchError, match=words):
        parse_vary(text)


def test_bad_csv_and_vary_lines_are_listed(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,cfg\nfine,1\nbad,99\nshort\n")
    items, errors = read_items(path, label="")
    assert [i.settings.prompt for i in items] == ["fine"]
    assert errors == [f"{path}:3: cfg must be in [0, 50] (got 99)", f"{path}:4: 1 cells; the header has 2 columns"]
    for header, words in (("promt,cfg\n", "unknown column 'promt'"), ("cfg\n", "no prompt column")):
        path.write_text(header + "x\n")
        with pytest.raises(BatchError, match=words):
            read_items(path)
    write(tmp_path / "p.txt", ["rain"])
    with pytest.raises(BatchError, match=r"--vary surface: no setting is called 'surface' and no prompt holds"):
        read_items(tmp_path / "p.txt", varies=[parse_vary("surface=a,b")])
    _, errors = read_items(tmp_path / "p.txt", varies=[parse_vary("cfg=1,99")])
    assert len(errors) == 1 and "cfg must be in [0, 50] (got 99)" in errors[0]


# ---- the driver, with a scripted executor ------------------------------------------------------


class ScriptedExecutor:
    """Workers that 'render' by writing small files; ``script(worker, unit) -> Outcome | None`` may fail a
    unit, lose the worker, or interrupt the driver."""

    def __init__(self, folder: Path, names=("a", "b"), script=None):
        self.folder, self.names, self.script = folder, list(names), script or (lambda w, u: None)
        self.queue, self.busy, self.runs = [], {}, []
        self.cancelled = False

    def start(self):
        return [WorkerInfo(n) for n in self.names]

    def check(self, items, folder):
        return {}

    def idle(self):
        return [n for n in self.names if n not in self.busy]

    def submit(self, worker, unit):
        self.busy[worker] = unit
        self.runs.append((worker, [i.id for i in unit.items]))

    def wait(self, timeout):
        if not self.busy:
            return []
        worker, unit = next(iter(self.busy.items()))
        del self.busy[worker]
        scripted = self.script(worker, unit)
        if isinstance(scripted, BaseException):
            self.busy[worker] = unit  # still running when the driver is interrupted
            raise scripted
        if scripted is not None:
            if scripted.lost:
                self.names.remove(worker)
            return [scripted]
        renderer = Renderer(lambda s: FakePipeline())
        return [Outcome(worker, unit, rendered=renderer.render(unit.items, self.folder, overwrite=True))]

    def running(self):
        return len(self.busy)

    def alive(self):
        return bool(self.names)

    def new_workers(self):
        return []

    def cancel(self):
        self.cancelled = True
        self.busy.clear()

    def shutdown(self):
        pass


class FakePipeline:
    """generate_many without models: one short second of silence per output."""

    def generate_many(self, runs):
        from types import SimpleNamespace

        return [self.generate(settings=s) for s in runs]

    def generate(self, settings, init_audio=None):
        from types import SimpleNamespace

        plan = SimpleNamespace(mode="text-to-audio", latents=1)
        audio = np.full((settings.num_outputs, 2, 441), 0.01 * (settings.seed % 50), np.float32)
        return SimpleNamespace(settings=settings.replace(dit_dtype="fp32"), plan=plan, codec="same-s", audio=audio)


def _items(tmp_path, n=6, **extra):
    return load_items(write(tmp_path / "p.jsonl", [{"id": f"i{k}", "prompt": f"p{k}", "seed": k, **extra}
                                                    for k in range(n)]), {"seconds": 1.0})


def test_a_failed_item_is_retried_elsewhere_then_recorded_and_the_rest_done(tmp_path):
    out, events = tmp_path / "out", []
    items = _items(tmp_path)

    def script(worker, unit):
        if "i3" in [i.id for i in unit.items]:
            return Outcome(worker, unit, error="bad init audio")

    ex = ScriptedExecutor(out, script=script)
    summary = Driver(items, out, ex, retries=2, batch_size=4, report=events.append).run()
    assert (summary.done, summary.failed, summary.left) == (5, 1, 0)
    # The group of four failed once and was split; i3 then failed on a, b, a (another worker each time).
    assert [w for w, ids in ex.runs if ids == ["i3"]] == ["b", "a", "b"]
    failures = [e for e in events if isinstance(e, ItemFailed)]
    assert [(e.attempts, e.final) for e in failures] == [(1, False), (2, False), (3, True)]
    entries = Manifest(out).load().entries
    assert entries["i3"]["status"] == "failed" and entries["i3"]["error"] == "bad init audio"
    assert entries["i3"]["attempts"] == 3 and sorted(entries["i3"]["workers"]) == ["a", "b"]
    assert all(entries[f"i{k}"]["status"] == "done" for k in (0, 1, 2, 4, 5))
    assert sorted(p.name for p in out.glob("*.wav")) == [f"i{k}.wav" for k in (0, 1, 2, 4, 5)]

    # Run again: only the failed item is tried again.
    ex = ScriptedExecutor(out)
    summary = Driver(items, out, ex).run()
    assert (summary.skipped, summary.done, summary.failed) == (5, 1, 0) and ex.runs == [("a", ["i3"])]


def test_a_lost_worker_has_its_unit_rescheduled_once(tmp_path):
    out, events = tmp_path / "out", []
    items = _items(tmp_path)
    lost = []

    def script(worker, unit):
        if worker == "a" and not lost:
            lost.append(unit)
            return Outcome(worker, unit, error="the worker was lost (killed)", lost=True)

    def killed_while_writing(worker, unit):
        outcome = script(worker, unit)
        if outcome is not None:  # what a SIGKILL between the temporary file and its rename leaves
            (out / f".{unit.items[0].id}.wav.x1y2z3.part").write_bytes(b"RIFF")
        return outcome

    ex = ScriptedExecutor(out, script=killed_while_writing)
    summary = Driver(items, out, ex, batch_size=2, report=events.append).run()
    assert (summary.done, summary.failed) == (6, 0)
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith(".sa3"))  # the folder's lock stays
    assert left == [f"i{k}.wav" for k in range(6)] + ["manifest.jsonl"]
    assert [type(e) for e in events if isinstance(e, WorkerLost)] == [WorkerLost]
    assert all(w == "b" for w, _ in ex.runs[1:])  # a is gone
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == [f"i{k}" for k in range(6)]  # once each


def test_ctrl_c_lets_running_units_finish_and_the_rerun_makes_the_rest(tmp_path):
    out, events = tmp_path / "out", []
    items = _items(tmp_path, n=8)
    calls = []

    def script(worker, unit):
        calls.append(worker)
        if len(calls) == 2:
            return KeyboardInterrupt()

    ex = ScriptedExecutor(out, script=script)
    summary = Driver(items, out, ex, batch_size=2, report=events.append).run()
    assert isinstance(summary.interrupted, KeyboardInterrupt) and not ex.cancelled
    assert [e.now for e in events if isinstance(e, Stopping)] == [False]
    # One unit was done before Ctrl-C; the two running then finished; the fourth never started.
    assert summary.done == 6 and summary.left == 2
    ex = ScriptedExecutor(out)
    summary = Driver(items, out, ex, batch_size=2).run()
    assert (summary.skipped, summary.done) == (6, 2)
    assert sorted(i for _, ids in ex.runs for i in ids) == sorted(
        i.id for i in items if i.id not in {e.rendered.item.id for e in events if isinstance(e, ItemDone)})

    # --now: running units are cancelled, nothing is recorded for them.
    out2 = tmp_path / "out2"
    ex = ScriptedExecutor(out2, script=lambda w, u: KeyboardInterrupt())
    summary = Driver(items, out2, ex, now=True).run()
    assert ex.cancelled and summary.done == 0 and summary.left == 8


def test_the_manifest_decides_what_is_done(tmp_path):
    out = tmp_path / "out"
    items = _items(tmp_path, n=3)
    Driver(items, out, ScriptedExecutor(out)).run()
    # A crash while the last line was written: the torn line is cut, the item made again.
    data = (out / "manifest.jsonl").read_bytes()
    (out / "manifest.jsonl").write_bytes(data[:-20])
    # A half-written temporary of a killed worker, a truncated output, a changed line.
    (out / ".i0.wav.abc123.part").write_bytes(b"RIFF")
    (out / "i1.wav").write_bytes((out / "i1.wav").read_bytes()[:100])
    changed = load_items(write(tmp_path / "p.jsonl", [{"id": "i0", "prompt": "p0", "seed": 0},
                                                      {"id": "i1", "prompt": "p1", "seed": 1},
                                                      {"id": "i2", "prompt": "p2 changed", "seed": 2}]),
                         {"seconds": 1.0})
    ex = ScriptedExecutor(out)
    summary = Driver(changed, out, ex).run()
    assert sorted(i for _, ids in ex.runs for i in ids) == ["i1", "i2"] and summary.skipped == 1
    assert not list(out.glob("*.part"))
    manifest = Manifest(out).load()
    assert manifest.skipped_lines == 0 and all(manifest.is_done(i) for i in changed)
    assert remove_partial_files(out, changed) == 0


def test_one_driver_per_folder(tmp_path):
    from sa3_mlx.batch.manifest import FolderBusy, FolderLock

    with FolderLock(tmp_path):
        with pytest.raises(FolderBusy, match="in use by another sa3 batch"):
            Driver(_items(tmp_path), tmp_path, ScriptedExecutor(tmp_path)).run()


# ---- the command, on the tiny bundle -----------------------------------------------------------


def test_sa3_batch_makes_what_sa3_makes_and_resumes(sa3, bundle, work, init_wav):
    init_wav(2.0, name="in.wav")
    (work / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    write(work / "jobs.jsonl", [
        {"id": "rain", "prompt": "rain on {surface}", "seed": 4, "cfg": 3, "negative_prompt": "wind"},
        {"prompt": "(thunder:1.5) far", "seed": 9, "num_outputs": 2, "format": "flac"},
        {"id": "sfx", "prompt": "glass", "model": "sm-sfx", "seed": 2, "seconds": 1.0},
        {"id": "a2a", "prompt": "jazz", "seed": 3, "init_audio": "in.wav", "init_noise_level": 0.7},
        {"id": "bad", "prompt": "x", "seed": 1, "init_audio": "broken.wav"},
    ])
    args = ["batch", "jobs.jsonl", "--out-dir", "renders", "--weights-dir", bundle, "--seconds", "1.5", "--steps", "2",
            "--vary", "surface=tin,slate", "--retries", "1", "--json"]
    code, out, err = sa3(*args)
    assert code == 1, err
    events = [json.loads(line) for line in out.splitlines()]
    done = {e["id"]: e for e in events if e["event"] == "done"}
    assert set(done) == {"rain-surfacetin", "rain-surfaceslate", "sfx", "a2a"} | {
        i.id for i in load_items(work / "jobs.jsonl", {"seconds": 1.5, "steps": 2}) if i.settings.prompt.startswith("(")}
    assert [(e["event"], e["attempts"]) for e in events if e.get("id") == "bad"] == [("retry", 1), ("failed", 2)]
    assert err.strip().splitlines()[-1].startswith("error: 1 of 6 items failed")
    summary = events[-1]
    assert summary["event"] == "summary" and (summary["done"], summary["failed"]) == (5, 1)

    # Each output is what `sa3` writes for the same settings.
    single = [
        ("rain-surfaceslate", ["--dit", "sm-music", "--prompt", "rain on slate", "--seed", "4", "--cfg", "3", "--negative-prompt", "wind"]),
        ("sfx", ["--prompt", "glass", "--dit", "sm-sfx", "--seed", "2", "--seconds", "1"]),
        ("a2a", ["--dit", "sm-music", "--prompt", "jazz", "--seed", "3", "--init-audio", "in.wav", "--init-noise-level", "0.7"]),
    ]
    for ident, flags in single:
        path = Path(done[ident]["outputs"][0]["path"])
        code, _, err = sa3("--weights-dir", bundle, "--seconds", "1.5", "--steps", "2", *flags, "--out", f"{ident}.wav")
        assert code == 0, err
        np.testing.assert_allclose(pcm(path), pcm(work / "output" / f"{ident}.wav"), atol=2)  # 16-bit LSBs
        assert read_metadata(path)["item"] == ident
    thunder = next(e for i, e in done.items() if len(e["outputs"]) == 2)
    assert [o["seed"] for o in thunder["outputs"]] == [9, 10] and thunder["outputs"][1]["path"].endswith("_2.flac")

    # Again: only the failed item runs (and fails again).
    code, out, err = sa3(*args)
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and events[0] == {"event": "started", "items": 6, "done_before": 5, "todo": 1}
    manifest = Manifest(work / "renders").load()
    assert sorted(manifest.entries) == sorted(list(done) + ["bad"])
    lines = (work / "renders" / "manifest.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["status"] == "done" for line in lines) == 5  # nothing made twice


@pytest.mark.parametrize("args, words", [
    (["missing.jsonl"], "missing.jsonl: no such file"),
    (["bad.jsonl"], "bad.jsonl: 1 bad line: bad.jsonl:2: cfg must be in [0, 50] (got 99) (or pass --skip-invalid)"),
    (["bad.jsonl", "--seconds", "0"], "--seconds must be in (0, 384]"),
    (["bad.jsonl", "--vary", "seed"], "--vary seed: give NAME=A..B"),
    (["bad.jsonl", "--workers", "2"], "--workers and --cpus-per-worker need --ray"),
    (["bad.jsonl", "--batch-size", "17"], "argument --batch-size: must be in [1, 16] (got 17)"),
    (["bad.jsonl", "--out-dir", "bad.jsonl"], "--out-dir bad.jsonl: not a folder"),
    (["bad.jsonl", "--out-dir", "s3://bucket/renders"], "object storage URLs are not written to directly"),
])
def test_sa3_batch_errors_are_one_line(sa3, work, args, words):
    write(work / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "no", "cfg": 99}])
    code, out, err = sa3("batch", *args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], lines[0]


def test_skip_invalid_and_dry_run(sa3, bundle, work):
    write(work / "bad.jsonl", [{"prompt": "ok", "seed": 1}, {"prompt": "no", "cfg": 99}])
    code, out, err = sa3("batch", "bad.jsonl", "--skip-invalid", "--dry-run", "--weights-dir", bundle, "--out-dir", "r")
    assert code == 0 and "warning: skipped" in err and "cfg must be in [0, 50]" in err
    assert out.startswith("1 items: 0 done, 1 to make in 1 batched runs (sm-music) on this machine")
    code, out, err = sa3("batch", "bad.jsonl", "--skip-invalid", "--dry-run", "--weights-dir", work, "--json")
    plan = json.loads(out)
    assert code == 1 and plan["todo"] == 1 and any("dit_sm_music" in p or "not in" in p for p in plan["problems"])
    assert not (work / "r").exists()


def test_without_ray_installed_the_flag_says_how(sa3, work, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    write(work / "p.txt", ["rain"])
    code, out, err = sa3("batch", "p.txt", "--ray", "local")
    assert code == 2 and "Ray is not installed here: pip install 'sa3-mlx[ray]'" in err and len(err.splitlines()) == 1


def test_relative_paths_are_the_files_and_hold_on_every_worker(tmp_path, monkeypatch):
    sub = tmp_path / "jobs"
    sub.mkdir()
    write(sub / "p.jsonl", [{"prompt": "x", "init_audio": "in.wav", "loras": ["style.safetensors:0.5@0.2-1",
                                                                            "/abs/b.safetensors"]}])
    (sub / "p.csv").write_text("prompt,loras\ny,style.safetensors:0.8;../other.safetensors\n")
    monkeypatch.chdir(tmp_path)
    item = load_items(Path("jobs/p.jsonl"))[0]
    assert item.settings.init_audio == str(sub / "in.wav")
    assert item.settings.loras == (f"{sub}/style.safetensors:0.5@0.2-1", "/abs/b.safetensors")
    assert load_items(Path("jobs/p.csv"))[0].settings.loras == (f"{sub}/style.safetensors:0.8",
                                                               f"{sub}/../other.safetensors")


def test_ctrl_c_in_a_local_run_finishes_the_running_item_and_resumes(bundle, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    write(tmp_path / "jobs.jsonl", [{"id": f"c{k:02d}", "prompt": f"drone {k}", "seed": k} for k in range(10)])
    argv = [sys.executable, "-m", "sa3_mlx", "batch", "jobs.jsonl", "--out-dir", "r", "--weights-dir", str(bundle),
            "--dit", "medium", "--seconds", "4", "--steps", "40", "--batch-size", "1", "--json"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "done":
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
            break
    rest, err = proc.communicate(timeout=120)
    seen += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err
    first = [e["id"] for e in seen if e["event"] == "done"]
    assert 1 <= len(first) <= 3 and seen[-1]["left"] == 10 - len(first)  # the running item finished, no more
    assert sorted(Manifest(tmp_path / "r").load().entries) == sorted(first)
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and events[0]["done_before"] == len(first)
    assert sorted(first + [e["id"] for e in events if e["event"] == "done"]) == [f"c{k:02d}" for k in range(10)]


def test_local_cluster_gives_its_workers_the_machine_cores():
    """`--ray local --workers N`: the cluster has the machine's cores (split among the workers), not N cores:
    one worker on a 2-core box used to get one core (and one BLAS thread), +60% per clip."""
    from sa3_mlx.batch.cluster import local_cluster_cpus

    assert local_cluster_cpus(1, None, cores=2) == 2
    assert local_cluster_cpus(2, None, cores=8) == 8  # 4 cores each (RayExecutor._placements splits them)
    assert local_cluster_cpus(4, None, cores=2) == 4  # more workers than cores: one each
    assert local_cluster_cpus(3, 2, cores=2) == 6  # as asked
    assert local_cluster_cpus(None, None, cores=2) == 2  # no count given: the machine's cores
    assert local_cluster_cpus(None, 2, cores=8) == 8
