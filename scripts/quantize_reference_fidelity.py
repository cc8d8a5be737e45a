"""SNR of the quantized DiT on the reference case (``$SA3_REFERENCE_DIR/golden``, the tiny random-weight
models the golden tests use): the DiT output of ``case_dit_small`` / ``case_dit_medium`` and the whole
replayed text-to-audio pipeline of ``case_pipeline_t2a`` (stored conditioning and noise, 8 pingpong steps,
SAME-S decoding), each against the unquantized fp32 run, per bit width and group size; also what
quantizing T5Gemma's or SAME's linear layers would cost (the policy keeps them unquantized).

    PYTHONPATH=. SA3_REFERENCE_DIR=../shared/reference python scripts/quantize_reference_fidelity.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import sa3_mlx  # noqa: F401  (the BLAS preload)
import mlx.core as mx
import mlx.nn as nn

from sa3_mlx import codec
from sa3_mlx.bench import snr_db
from sa3_mlx.denoiser import Denoiser
from sa3_mlx.models.dit import load_dit
from sa3_mlx.models.same import load_same
from sa3_mlx.models.t5gemma import load_t5gemma
from sa3_mlx.quantize import Quantization, quantize_module
from sa3_mlx.sampling import Guidance, pingpong_schedule


def main() -> int:
    golden = Path(os.environ.get("SA3_REFERENCE_DIR", "../shared/reference")) / "golden"
    specs = [Quantization(8, 64), Quantization(8, 32), Quantization(4, 128), Quantization(4, 64), Quantization(4, 32)]
    print("| part (reference case) | " + " | ".join(f"q{q.bits} g{q.group_size}" for q in specs) + " |")
    print("|---|" + "---|" * len(specs))
    for name, file, case_file in (("DiT small output", "dit_sm_tiny_f16.npz", "case_dit_small.npz"),
                                  ("DiT medium output", "dit_medium_tiny_f16.npz", "case_dit_medium.npz")):
        with np.load(golden / case_file) as f:
            args = [mx.array(f[k]) for k in ("x", "t", "cross_attn_cond", "global_cond")]
        ref = np.array(load_dit(golden / file)[0](*args))
        row = [snr_db(ref, np.array(load_dit(golden / file, quantize=q)[0](*args))) for q in specs]
        print(f"| {name} | " + " | ".join(f"{v:.1f} dB" for v in row) + " |")

    with np.load(golden / "case_pipeline_t2a.npz") as f:
        case = {k: f[k] for k in f.files}
    decoder = load_same(golden / "same_s_decoder_tiny_f32.npz", role="decoder")
    noise = mx.array(case["supplied_noise"])

    def pipeline_audio(dit, dec=decoder):
        latents = Denoiser(dit, compile_steps=False).sample(
            noise[:1], pingpong_schedule(8, 1.0), mx.array(case["cross_attn_batched"]),
            mx.array(case["global_cond_batched"]), None, Guidance(), lambda i, shape, dt: noise[i + 1][None].astype(dt))
        return np.array(codec.unpatchify(codec.decode(dec, latents)))[0]

    ref = pipeline_audio(load_dit(golden / "dit_sm_tiny_f16.npz")[0])
    row = [snr_db(ref, pipeline_audio(load_dit(golden / "dit_sm_tiny_f16.npz", quantize=q)[0])) for q in specs]
    print("| pipeline audio (t2a, DiT quantized) | " + " | ".join(f"{v:.1f} dB" for v in row) + " |")

    # What the policy leaves out, measured: every linear layer of the text encoder or the decoder quantized.
    def all_linears(module, q):
        return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.weight.shape[1] % q.group_size == 0]

    with np.load(golden / "case_t5gemma.npz") as f:
        ids, mask = mx.array(f["input_ids_with_bos"]), mx.array(f["attention_mask_with_bos"])
    t5_ref = np.array(load_t5gemma(golden / "t5gemma_tiny_f16.npz")[0](ids, mask))
    row = []
    for q in specs:
        t5 = load_t5gemma(golden / "t5gemma_tiny_f16.npz")[0]
        quantize_module(t5, q, [n for n in all_linears(t5, q) if n.rsplit(".", 1)[-1] != "embed_tokens"])
        row.append(snr_db(t5_ref, np.array(t5(ids, mask))))
    print("| T5Gemma embeddings (its linears quantized) | " + " | ".join(f"{v:.1f} dB" for v in row) + " |")
    row = []
    for q in specs:
        dec = load_same(golden / "same_s_decoder_tiny_f32.npz", role="decoder")
        quantize_module(dec, q, all_linears(dec, q))
        row.append(snr_db(ref, pipeline_audio(load_dit(golden / "dit_sm_tiny_f16.npz")[0], dec)))
    print("| pipeline audio (SAME-S decoder's linears quantized) | " + " | ".join(f"{v:.1f} dB" for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
