"""How close the CPU's bf16 DiT and codecs (oneDNN products, ``--dit-dtype bf16``, ``--codec-dtype bf16``) come to
the fp32 path: SNR in dB.

    PYTHONPATH=. SA3_REFERENCE_DIR=../shared/reference python scripts/bf16_fidelity.py [--seconds 30] [--json]

1. The DiT output v of a full-size random sm-music DiT at ``--seconds`` (one forward per noise level, the
   same module and inputs in fp32 and then with bf16 products), against its fp32 output.
2. The pipeline (full-size random weights, one seed): the latents and the audio of ``--dit-dtype bf16``
   against ``--dit-dtype fp32``. A random SAME decoder is far less sensitive to its latents than the
   trained one, so the latents are the figure to read here; the audio's is printed for completeness.
3. The reference case (``case_pipeline_t2a.npz``, tiny random weights, the official runner's noise): latents
   and audio with bf16 products against the fp32 reference run.

4. The codecs (``--codec-dtype bf16``: their linear layers' products in bf16): each reference codec case
   (SAME-S and SAME-L, decoder and encoder, tiny random weights) against the official fp32 output, in fp32
   and with bf16 products; the reference pipeline's audio decoded with bf16 products (after the fp32 and the
   bf16 DiT); and a full-size random SAME-S decoder's ``--seconds`` of audio against its fp32 decode.

SNR = 10 log10(sum ref^2 / sum (x - ref)^2). The official runner's bar for its fp16 DiT: 50 dB.
Random weights have none of the outliers trained weights have, so the real models may do worse.
Needs the bf16 path here (:func:`sa3_mlx.kernels.onednn.status`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sa3_mlx  # noqa: E402,F401  (the BLAS preload and OpenMP setting come first)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from sa3_mlx import kernels  # noqa: E402
from sa3_mlx.kernels import onednn  # noqa: E402


def snr_db(reference, x) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    error = np.asarray(x, dtype=np.float64) - reference
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum(error**2), 1e-300)))


def dit_output(seconds: float) -> dict:
    from sa3_mlx.models.dit import DiT, DiTConfig
    from sa3_mlx.sources.modules import RELEASED_DIT

    mx.random.seed(0)
    dit = DiT(DiTConfig(**RELEASED_DIT["sm-music"]))
    mx.eval(dit.parameters())
    cpu = kernels.by_name("cpu")
    cpu.prepare(dit)
    latents = int(np.ceil(seconds * 44100 / 4096 / 2) * 2)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 256, latents), dtype=np.float32))
    cross = mx.array(rng.standard_normal((1, 17, 768), dtype=np.float32))
    global_cond = mx.array(rng.standard_normal((1, 768), dtype=np.float32))
    levels = (0.99, 0.5, 0.1)
    with kernels.use(cpu):
        reference = [np.array(dit(x, mx.array([t]), cross, global_cond)) for t in levels]
        onednn.use_bf16_products(dit)
        bf16 = [np.array(dit(x, mx.array([t]), cross, global_cond)) for t in levels]
    return {f"t={t}": round(snr_db(r, b), 1) for t, r, b in zip(levels, reference, bf16)}


def pipeline(seconds: float, seed: int = 1) -> dict:
    from sa3_mlx.bench import random_pipeline
    from sa3_mlx.sources.modules import BENCH_PROMPT

    outputs = {}
    for dtype in (mx.float32, mx.bfloat16):
        mx.random.seed(0)  # the same random weights for both: built in the same order from the same seed
        pipe = random_pipeline("sm-music", dit_dtype=dtype)
        _ = pipe.text, pipe.dit, pipe.decoder
        result = pipe.generate(BENCH_PROMPT, seconds=seconds, seed=seed)
        outputs[dtype] = (np.array(result.latents), np.array(result.audio))
        del pipe, result
    (latents, audio), (latents_bf16, audio_bf16) = outputs[mx.float32], outputs[mx.bfloat16]
    return {"latents": round(snr_db(latents, latents_bf16), 1), "audio": round(snr_db(audio, audio_bf16), 1),
            "audio_rms": float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))}


def reference_case(reference_dir: Path) -> dict:
    from sa3_mlx import codec
    from sa3_mlx.denoiser import Denoiser
    from sa3_mlx.models.dit import load_dit
    from sa3_mlx.models.same import load_same
    from sa3_mlx.sampling import Guidance, pingpong_schedule

    golden = reference_dir / "golden"
    with np.load(golden / "case_pipeline_t2a.npz") as f:
        case = {k: f[k] for k in f.files}
    cpu = kernels.by_name("cpu")
    decoder = load_same(golden / "same_s_decoder_tiny_f32.npz", role="decoder")
    decoder_bf16 = load_same(golden / "same_s_decoder_tiny_f32.npz", role="decoder")
    cpu.prepare(decoder_bf16, mx.bfloat16)
    noise = mx.array(case["supplied_noise"])
    out, audio_codec_bf16 = {}, {}
    for name in ("fp32", "bf16"):
        with kernels.use(cpu):
            dit, _, _ = load_dit(golden / "dit_sm_tiny_f16.npz", dtype=mx.float32)
            cpu.prepare(dit, mx.bfloat16 if name == "bf16" else None)
            latents = Denoiser(dit, compile_steps=False).sample(
                noise[:1], pingpong_schedule(8, 1.0), mx.array(case["cross_attn_batched"]),
                mx.array(case["global_cond_batched"]), None, Guidance(),
                lambda i, shape, dtype: noise[i + 1][None].astype(dtype))
            samples = case["audio"].shape[-1]
            audio = np.array(codec.unpatchify(codec.decode(decoder, latents)))[0, :, :samples]
            audio_codec_bf16[name] = np.array(codec.unpatchify(codec.decode(decoder_bf16, latents)))[0, :, :samples]
        out[name] = (np.array(latents), audio)
    return {
        "latents_vs_reference": {n: round(snr_db(case["latents"], out[n][0]), 1) for n in out},
        "audio_vs_reference": {n: round(snr_db(case["audio"], out[n][1]), 1) for n in out},
        "audio_vs_reference_codec_bf16": {f"dit {n}": round(snr_db(case["audio"], a), 1)
                                          for n, a in audio_codec_bf16.items()},
        "bf16_vs_fp32": {"latents": round(snr_db(out["fp32"][0], out["bf16"][0]), 1),
                         "audio": round(snr_db(out["fp32"][1], out["bf16"][1]), 1)},
    }


def codecs(reference_dir: Path, seconds: float) -> dict:
    from sa3_mlx import codec
    from sa3_mlx.models.same import load_same
    from sa3_mlx.sources.modules import random_source

    golden = reference_dir / "golden"
    cpu = kernels.by_name("cpu")
    results = {}
    for family in ("s", "l"):
        overrides = {}
        if family == "l":  # the tiny SAME-L decoder's sin gates (the reference README; tests/test_same.py)
            overrides = {"sinusoidal_blocks": json.loads((golden / "same_l_tiny_config.json").read_text())[
                "torch_sinusoidal_blocks"]}
        for role in ("decoder", "encoder"):
            with np.load(golden / f"case_same_{family}_{role}.npz") as f:
                case = {k: f[k] for k in f.files}
            x, reference = (case["latents"], case["patches"]) if role == "decoder" else (case["audio_patches"],
                                                                                         case["latents"])
            row = {}
            for name in ("fp32", "bf16"):
                model = load_same(golden / f"same_{family}_{role}_tiny_f32.npz", role=role,
                                  **(overrides if role == "decoder" else {}))
                if name == "bf16":
                    cpu.prepare(model, mx.bfloat16)
                with kernels.use(cpu):
                    row[name] = round(snr_db(reference, np.array(model(mx.array(x)))), 1)
            results[f"same_{family}_{role}_vs_reference"] = row
    source = random_source("sm-music")
    latents = int(np.ceil(seconds * 44100 / codec.SAMPLES_PER_LATENT))
    x = mx.array(np.random.default_rng(0).standard_normal((1, 256, latents), dtype=np.float32))
    decoded = {}
    for name in ("fp32", "bf16"):
        decoder = source.load_codec("same-s", "decoder", mx.float32)
        if name == "bf16":
            cpu.prepare(decoder, mx.bfloat16)
        with kernels.use(cpu):
            decoded[name] = np.array(codec.unpatchify(codec.decode(decoder, x)))
    results["full_size_same_s_decode_bf16_vs_fp32"] = round(snr_db(decoded["fp32"], decoded["bf16"]), 1)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--skip-pipeline", action="store_true", help="leave out part 2 (two full generations)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    ok, why = onednn.status()
    if not ok:
        print(f"the bf16 path is not available here: {why}", file=sys.stderr)
        return 2
    results = {"onednn": why, "seconds": args.seconds, "dit_output_snr_db": dit_output(args.seconds)}
    if not args.skip_pipeline:
        results["pipeline_snr_db"] = pipeline(args.seconds)
    reference_dir = Path(os.environ.get("SA3_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
    if (reference_dir / "golden").is_dir():
        results["reference_case_snr_db"] = reference_case(reference_dir)
        results["codec_snr_db"] = codecs(reference_dir, args.seconds)
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
