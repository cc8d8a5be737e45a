"""``sa3 bench --train``: the speed of one training step (forward, backward, AdamW) on the
released architectures with random full-size weights (the speed does not depend on the values)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from ..runtime import compile_by_default, training_step_modes
from .adapters import AdapterConfig, LoraParametrization
from .optimizer import AdamW
from .step import Batch, TrainStep

PROMPT_TOKENS = 128  # the released models' text length


def bench_step(model: str = "sm-music", crop: int = 256, adapter: str = "dora-rows", rank: int = 16,
               steps: int = 5, warmup: int = 1, dtype: str | None = None, checkpointing: bool = False,
               batch_size: int = 1, fused: bool = False,
               compiled_optimizer: bool | None = None, compiled_step: bool | None = None,
               merged_weights: bool | None = None) -> dict:
    """ms/step, it/s, peak memory and trainable parameters of ``model`` at a ``crop``-latent crop."""
    from mlx.utils import tree_flatten

    from ..lora import SECONDS_KEY
    from ..sources.modules import random_source
    from .run import PRECISIONS

    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    dit, conditioner = random_source(model).load_dit(PRECISIONS[dtype])
    weights = dict(tree_flatten(dit.parameters()))
    weights[SECONDS_KEY] = conditioner.seconds_total_weight
    lora = LoraParametrization.build(weights, AdapterConfig(adapter, rank), base_dtype=PRECISIONS[dtype])
    del weights
    step = TrainStep(dit, conditioner, lora, mask_loss_weight=1.0, checkpointing=checkpointing, fused=fused,
                     **training_step_modes(compiled_step, merged_weights, checkpointing))
    params = step.pack(lora.init_params(seed=0))  # the layout `sa3 train` steps in
    optimizer = AdamW(compiled=compile_by_default() if compiled_optimizer is None else compiled_optimizer)
    rng = np.random.default_rng(0)
    B, C, T = batch_size, dit.config.io_channels, crop
    batch = Batch(
        x0=mx.array(rng.standard_normal((B, C, T), dtype=np.float32)),
        noise=mx.array(rng.standard_normal((B, C, T), dtype=np.float32)),
        t=mx.array(rng.random(B).astype(np.float32)),
        prompt_embeds=mx.array(rng.standard_normal((B, PROMPT_TOKENS, dit.config.cond_token_dim), dtype=np.float32)),
        prompt_mask=mx.array((np.arange(PROMPT_TOKENS) < 20)[None].repeat(B, 0).astype(np.float32)),
        seconds=mx.array(np.full(B, T * 4096 / 44100, np.float32)), cfg_keep=mx.ones((B,)),
        padding_mask=mx.ones((B, T)), inpaint_mask=mx.zeros((B, T)))
    mx.eval(params)

    def one():
        nonlocal params
        loss, grads = step.loss_and_grad(params, batch)
        params, _ = optimizer.update(params, grads)
        mx.eval(params, loss, [s for pair in optimizer.state.values() for s in pair])

    start = time.perf_counter()
    one()  # traces and compiles (compiled step, fused)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        one()
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    ms = 1000 * float(np.median(times))
    return {"model": model, "crop": crop, "adapter": adapter, "rank": rank, "batch": B, "base_precision": dtype,
            "checkpointing": checkpointing, "fused": step.fused, "compiled_step": step.compiled,
            "merged_weights": step.merged_weights, "compiled_optimizer": optimizer.compiled,
            "first_step_s": round(first, 2), "ms_per_step": round(ms, 2), "it_per_s": round(1000 / ms, 3),
            "peak_bytes": int(mx.get_peak_memory()), "trainable_parameters": lora.trainable_count(),
            "modules": len(lora.targets), "device": str(mx.default_device())}
