"""The guided velocity of one DiT, sampled: step-function compile cache and the memory policy
that runs a long clip's step block by block.

:class:`Denoiser` holds a DiT and what was compiled for it; the pipeline makes one per
loaded DiT, so compiled steps live exactly as long as the weights they traced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

from .models.dit import DiT, DiTConditioning
from .runtime import compile_by_default
from .sampling import SAMPLERS, Guidance, StepNoise, Velocity, apply_guidance
from .sources import DISTILLED_DEFAULTS

# Activation memory above which a sampler step runs block by block (see Denoiser.steps).
STEP_MEMORY = 2 << 30


def _predict_fn(dit: DiT, blocks: list | None = None) -> Callable:
    """``(x, t, cond) -> v``; the conditioning is a tuple of arrays (what mx.compile takes as inputs).
    ``blocks``: run block by block with these (see DiT.predict)."""

    def predict(x: mx.array, t: mx.array, cond: tuple) -> mx.array:
        context_kv, global_embed, local_embeds, *value_mask = cond
        step_cond = DiTConditioning(None, context_kv, global_embed, local_embeds, *value_mask)
        return dit.predict(x, dit.embed_timestep(dit.timestep_features(t)), step_cond, blocks)

    return predict


def _guided_fn(dit: DiT, batch: int, guidance: Guidance, blocks: list | None = None) -> Callable:
    """``(x, t, cond_and_uncond, (mask,) or ()) -> guided v``: cond and uncond in one batched forward."""
    predict = _predict_fn(dit, blocks)

    def guided(x: mx.array, t: mx.array, pair: tuple, extras: tuple) -> mx.array:
        v = predict(mx.concatenate([x, x]), mx.concatenate([t, t]), pair)
        return apply_guidance(x, t, v[:batch], v[batch:], guidance, *extras)

    return guided


def _as_inputs(c: DiTConditioning) -> tuple:
    # The value mask only when there is one: mx.compile takes arrays, not None.
    return (c.context_kv, c.global_embed, c.local_embeds) + (() if c.value_mask is None else (c.value_mask,))


def _tracking(velocity: Velocity, holder) -> Velocity:
    """``velocity`` that also keeps, as ``holder.denoised``, the clean latents its last evaluation predicts
    (rectified flow: ``x = (1 - s) x0 + s noise`` and ``v = noise - x0``, so ``x0 = x - s v``): a live
    preview's input, computed (lazily) only when asked for."""

    def tracked(x: mx.array, t: mx.array, level: float) -> mx.array:
        v = velocity(x, t, level)
        holder.denoised = x - level * v
        return v

    return tracked


class Denoiser:
    """Sampling with one DiT: cond and uncond in one batched forward, steps compiled once (GPU).
    ``denoised``: after each step of :meth:`steps`, the clean latents its last model evaluation predicts."""

    denoised: mx.array | None = None

    def __init__(self, dit: DiT, compile_steps: bool | None = None):
        self.dit = dit
        self.compile_steps = compile_by_default() if compile_steps is None else compile_steps
        self._compiled: dict = {}

    def _step_function(self, key, make: Callable[[], Callable]) -> Callable:
        """A per-step function, compiled once and kept across generations (GPU).

        Compiling traces the function; a fresh ``mx.compile`` every generation would
        retrace it every time, which costs more than a step.
        """
        if not self.compile_steps:
            return make()
        if key not in self._compiled:
            self._compiled[key] = mx.compile(make())
        return self._compiled[key]

    def _block_functions(self) -> list[Callable]:
        """The DiT's blocks as callables for block-by-block steps: compiled where steps are
        (one trace per block, kept across generations), else the blocks themselves."""
        blocks = self.dit.transformer.layers
        if not self.compile_steps:
            return list(blocks)
        if "blocks" not in self._compiled:
            self._compiled["blocks"] = [mx.compile(block) for block in blocks]
        return self._compiled["blocks"]

    def velocity(
        self,
        batch: int,
        latents: int,
        cross: mx.array,
        global_cond: mx.array,
        uncond: mx.array | None,
        guidance: Guidance,
        local_cond: mx.array | None = None,
        padding_mask: mx.array | None = None,
    ) -> Velocity:
        """The guided velocity ``(x, t, level) -> v`` for ``batch`` items of ``latents`` latents.

        What does not change across steps (context and global projections, local
        conditioning embeddings) is computed once here, not in every step. Guidance runs
        (cond and uncond in one batched forward) when ``uncond`` is given and the noise
        ``level`` is inside ``guidance.interval``; otherwise the conditional model alone.
        ``padding_mask`` [1|B, T] (1 = valid latent) hides padded latents from the self-attention.
        """
        dit = self.dit

        def expand(a: mx.array | None) -> mx.array | None:
            return None if a is None else mx.broadcast_to(a, (batch, *a.shape[1:]))

        mask = expand(padding_mask)
        cond = _as_inputs(dit.condition(expand(cross), expand(global_cond), local_cond, mask))
        if uncond is not None:
            pair = _as_inputs(dit.condition(
                mx.concatenate([expand(cross), expand(uncond)]),
                mx.concatenate([expand(global_cond)] * 2),
                None if local_cond is None else mx.concatenate([expand(local_cond)] * 2),
                None if mask is None else mx.concatenate([mask] * 2),
            ))

        # A long clip's step, run as one graph, holds every block's activations at once
        # (3.7 GB above the weights for the medium model at 120 s, 9 GB at 380 s on an
        # H100, measured): then the blocks run one after another, each compiled.
        rows = batch * (2 if uncond is not None else 1)
        if dit.step_activation_bytes(latents, rows) > STEP_MEMORY:
            blocks = self._block_functions()
            predict, guided = _predict_fn(dit, blocks), _guided_fn(dit, batch, guidance, blocks)
        else:
            predict = self._step_function("predict", lambda: _predict_fn(dit))
            guided = self._step_function(
                ("guided", batch, guidance, mask is not None), lambda: _guided_fn(dit, batch, guidance)
            )
        guided_extras = () if mask is None else (mask,)

        def velocity(x: mx.array, t: mx.array, level: float) -> mx.array:
            if uncond is None or not guidance.active_at(level):
                return predict(x, t, cond)
            return guided(x, t, pair, guided_extras)

        return velocity

    def steps(
        self,
        noise: mx.array,
        sigmas: mx.array,
        cross: mx.array,
        global_cond: mx.array,
        uncond: mx.array | None,
        guidance: Guidance,
        step_noise: StepNoise,
        local_cond: mx.array | None = None,
        padding_mask: mx.array | None = None,
        sampler: str = DISTILLED_DEFAULTS.sampler,
        dtype: mx.Dtype | None = None,
    ) -> Iterator[mx.array]:
        """The sampler's state after each step (the last one is the result).

        ``sampler`` is a key of ``sampling.SAMPLERS``; a step is one sampler step, however
        many model evaluations it takes (rk4: four). See :meth:`velocity` for the rest.
        Stopping the iteration early stops sampling at that step.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        velocity = self.velocity(noise.shape[0], noise.shape[-1], cross, global_cond, uncond, guidance,
                                 local_cond, padding_mask)
        x = noise.astype(dtype or self.dit.dtype)
        yield from SAMPLERS[sampler](_tracking(velocity, self), x, sigmas, step_noise)

    def sample(self, *args, on_step: Callable[[int, int], None] | None = None, **kwargs) -> mx.array:
        """:meth:`steps` run to the end; ``on_step(k, n)`` after each step."""
        sigmas = args[1] if len(args) > 1 else kwargs["sigmas"]
        total = sigmas.shape[0] - 1
        x = None
        for i, x in enumerate(self.steps(*args, **kwargs), start=1):
            if on_step is not None:
                on_step(i, total)
        return x


class GatedDenoiser:
    """Sampling where the model depends on the noise level: LoRAs active at some levels only.

    ``pick(level)`` gives the :class:`Denoiser` (a DiT with its own merged weights) for a level; each
    step evaluates the one its level picks, with that DiT's own conditioning projections (made once
    per DiT and generation). A step costs what a step of one merged DiT costs; the price is memory, one
    DiT per distinct set of active LoRAs, and their merge when first used.
    """

    denoised: mx.array | None = None

    def __init__(self, pick: Callable[[float], Denoiser]):
        self.pick = pick

    def steps(self, noise: mx.array, sigmas: mx.array, cross: mx.array, global_cond: mx.array,
              uncond: mx.array | None, guidance: Guidance, step_noise: StepNoise, local_cond: mx.array | None = None,
              padding_mask: mx.array | None = None, sampler: str = DISTILLED_DEFAULTS.sampler,
              dtype: mx.Dtype | None = None) -> Iterator[mx.array]:
        """As :meth:`Denoiser.steps`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        velocities: dict[int, Velocity] = {}

        def velocity(x: mx.array, t: mx.array, level: float) -> mx.array:
            denoiser = self.pick(float(level))
            if id(denoiser) not in velocities:
                velocities[id(denoiser)] = denoiser.velocity(noise.shape[0], noise.shape[-1], cross, global_cond,
                                                             uncond, guidance, local_cond, padding_mask)
            return velocities[id(denoiser)](x, t, level)

        first = self.pick(float(sigmas[0].item()))
        x = noise.astype(dtype or first.dit.dtype)
        yield from SAMPLERS[sampler](_tracking(velocity, self), x, sigmas, step_noise)
