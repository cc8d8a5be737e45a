"""``sa3 bench --batch``: clips per minute of ``sa3 batch`` on this machine, without Ray and with 1..N Ray
workers (a throwaway local cluster), against a loop of ``sa3`` processes, on full-size random weights written
to disk once (:func:`~sa3_mlx.sources.modules.write_random_bundle`). Each configuration runs as its own
process, as a user runs it: "end to end" counts the start (cluster, workers, model loads), "steady" only
the items (the driver's own clock), which is what the Ray overhead per item is measured on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(argv: list[str], env: dict) -> tuple[float, str, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return wall, done.stdout, done.stderr


def measure(model: str, seconds: float, clips: int, steps: int, workers: list[int], bundle: Path,
            cli_loop: bool = True, batch_size: int = 1) -> dict:
    from ..sources.modules import write_random_bundle

    write_random_bundle(bundle, (model,))
    python = [sys.executable, "-m", "sa3_mlx"]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    common = ["--dit", model, "--seconds", f"{seconds:g}", "--steps", str(steps), "--weights-dir", str(bundle)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sa3-bench-batch-") as tmp:
        tmp = Path(tmp)
        jobs = tmp / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"id": f"clip{k:04d}", "prompt": "warm analog synth arpeggio",
                                            "seed": k}) + "\n" for k in range(clips)))
        if cli_loop:
            started = time.perf_counter()
            for k in range(clips):
                _run(python + common + ["--prompt", "warm analog synth arpeggio", "--seed", str(k),
                                        "--out", str(tmp / "loop" / f"clip{k:04d}.wav")], env)
            wall = time.perf_counter() - started
            rows.append(dict(config="sa3 loop (a process per clip)", end_to_end_s=round(wall, 2),
                             clips_per_min=round(clips / wall * 60, 2)))
        configs = [("sa3 batch (this process)", [])] + [
            (f"sa3 batch --ray local --workers {n}", ["--ray", "local", "--workers", str(n)]) for n in workers]
        for k, (name, extra) in enumerate(configs):
            folder = tmp / f"out{k}"
            wall, out, _ = _run(python + ["batch", str(jobs), "--out-dir", str(folder), "--json", "--batch-size",
                                          str(batch_size)] + common + extra, env)
            events = [json.loads(line) for line in out.strip().splitlines()]
            done = sorted(e["elapsed"] for e in events if e["event"] == "done")
            row = dict(config=name, end_to_end_s=round(wall, 2), clips_per_min=round(clips / wall * 60, 2))
            if len(done) > 1:  # from the first clip done (models loaded, graphs warm) to the last
                per_clip = (done[-1] - done[0]) / (len(done) - 1)
                row.update(steady_s_per_clip=round(per_clip, 3), steady_clips_per_min=round(60 / per_clip, 2))
            rows.append(row)
    base = next((r for r in rows if r["config"].startswith("sa3 batch (")), None)
    for r in rows:
        if base and "steady_s_per_clip" in r and r is not base:
            r["per_clip_vs_batch"] = f"{(r['steady_s_per_clip'] / base['steady_s_per_clip'] - 1) * 100:+.1f}%"
    return dict(model=model, seconds=seconds, clips=clips, steps=steps, batch_size=batch_size, rows=rows)


def main(args, info: dict) -> int:
    """``args``: the parsed ``sa3 bench`` flags; ``info``: the machine (``sa3_mlx.bench.hardware()``)."""
    workers = [int(x) for x in str(args.batch_workers).split(",") if x]
    model = next(m for m in args.models.split(",") if m)  # the first of each: one measured configuration
    seconds = next(float(x) for x in str(args.seconds).split(",") if x)
    results = [measure(model, seconds, args.batch, args.steps, workers, Path(args.bundle_dir), not args.no_cli_loop)]
    if args.json:
        print(json.dumps(dict(hardware=info, batch=results), indent=1))
        return 0
    for r in results:
        print(f"{r['model']} {r['seconds']:g} s clips, {r['clips']} clips, {r['steps']} steps ({info.get('device')})")
        for row in r["rows"]:
            steady = (f"   steady {row['steady_clips_per_min']:.1f} clips/min ({row['steady_s_per_clip']:.2f} s/clip"
                      + (f", {row['per_clip_vs_batch']} vs in-process" if "per_clip_vs_batch" in row else "") + ")"
                      if "steady_s_per_clip" in row else "")
            print(f"  {row['config']:<36} {row['clips_per_min']:7.1f} clips/min end to end ({row['end_to_end_s']:.1f} s)"
                  + steady)
    return 0
