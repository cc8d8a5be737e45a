"""One object holding the models: prompt -> conditioning -> sampling -> decoding.

``Pipeline`` loads the text encoder, a DiT with its conditioner, and the codec
halves it needs, then generates as many times as asked with the models resident.
Every stage records its wall time and peak memory.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import codec, hub, upstream
from .conditioning import Conditioner, load_conditioner
from .lora import LoraStack
from .models.dit import DiT, DiTConditioning, load_dit
from .kernels.cpu import store_linear_weights_transposed
from .models.same import load_same
from .models.t5gemma import load_t5gemma
from .sampling import SAMPLERS, Guidance, apply_guidance, build_schedule, paste_back, seeded_step_noise
from .weights import NpzWeights, WeightDict

SAMPLE_RATE = codec.SAMPLE_RATE
SAMPLES_PER_LATENT = codec.SAMPLES_PER_LATENT
# Activation memory above which a sampler step runs block by block (see Pipeline.sample).
STEP_MEMORY = 2 << 30
PROMPT_TOKENS = 256  # the official MLX/TensorRT runners' T5 length: 256 tokens + 1 seconds token
MIN_NOISE_LEVEL = 0.01  # below this the schedule collapses and the model is undefined
DTYPE_NAMES = {mx.float32: "fp32", mx.float16: "fp16", mx.bfloat16: "bf16"}


def latent_length(seconds: float, codec_name: str) -> int:
    """Latents sampled for ``seconds`` of audio: ceil(seconds * 44100 / 4096), even for SAME-S.

    SAME-S works on pairs of latents (its 32-token chunks), so its latent count is
    rounded up to even, as the official MLX runner does; the audio is trimmed back
    to the requested length after decoding.
    """
    n = max(1, math.ceil(seconds * SAMPLE_RATE / SAMPLES_PER_LATENT))
    if codec_name == "same-s" and n % 2:
        n += 1
    return n


def inpaint_keep_mask(ranges: Sequence[tuple[float, float]], seconds: float, n_latents: int) -> np.ndarray:
    """``[n_latents]`` float mask, 1 = keep the init latent, 0 = regenerate.

    Follows the PyTorch reference: regenerate samples ``[int(start*sr), int(end*sr))``
    of each range and everything past ``seconds``, then take latent ``j`` from
    sample ``4096 * j`` (nearest downsampling).
    """
    total = int(seconds * SAMPLE_RATE)
    sample_of_latent = np.arange(n_latents) * SAMPLES_PER_LATENT
    keep = sample_of_latent < total
    for start, end in ranges:
        lo, hi = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        keep &= ~((sample_of_latent >= lo) & (sample_of_latent < hi))
    return keep.astype(np.float32)


@dataclass
class GenerationPlan:
    mode: str  # text-to-audio, audio-to-audio, inpainting or continuation
    latents: int
    init_noise_level: float
    inpaint: list[tuple[float, float]]  # ranges to regenerate, continuation tail included
    warnings: list[str]
    # With headroom: the latents the DiT attends to (upstream generate()'s padding mask); None = all.
    valid_latents: int | None = None


@dataclass
class StageStats:
    name: str
    seconds: float
    peak_bytes: int


@dataclass
class GenerationResult:
    audio: np.ndarray  # [batch, 2, samples] float32, not clipped
    sample_rate: int
    settings: dict
    latents: np.ndarray  # [batch, 256, T] the sampled latents
    stages: list[StageStats] = field(default_factory=list)


def _peak_memory() -> int:
    return int(mx.get_peak_memory())


def _free() -> None:
    gc.collect()
    mx.clear_cache()


@dataclass(frozen=True)
class ModelDefaults:
    """Recommended sampling settings of a generator."""

    steps: int
    cfg: float
    sampler: str  # a key of sampling.SAMPLERS


# The official MLX bundles are the distilled (rf_denoiser) generators.
DISTILLED_DEFAULTS = ModelDefaults(steps=8, cfg=1.0, sampler="pingpong")


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


class Pipeline:
    """Stable Audio 3 text-to-audio, audio-to-audio and inpainting with resident models.

    ``model`` is one of ``hub.MODELS`` (``sm-music``, ``sm-sfx``, ``medium``: the
    official MLX files) or an original PyTorch release (a Hugging Face repo id such as
    ``stabilityai/stable-audio-3-small-music``, or a local folder with
    ``model_config.json``; see :mod:`sa3_mlx.upstream`). ``codec`` defaults to the one
    it was trained with. Files come from ``weights_dir`` when given, otherwise from
    the Hugging Face cache (downloaded on first use). ``dit_dtype`` defaults to
    float32 on the CPU (MLX's half-precision matmul is slow there) and float16 on a
    GPU. ``loras``: ``"FILE[:STRENGTH]"`` (or ``(path, strength)``) adapters in the
    upstream format, stacked in order and merged into the DiT
    (:meth:`set_lora_strength` changes strengths later).
    """

    def __init__(
        self,
        model: str = "sm-music",
        codec_name: str | None = None,
        weights_dir: str | Path | None = None,
        dit_dtype: mx.Dtype | None = None,
        codec_dtype: mx.Dtype | None = None,
        progress: bool = True,
        loras: Sequence = (),
    ):
        self.upstream: upstream.UpstreamModel | None = None
        self.defaults = DISTILLED_DEFAULTS
        if model not in hub.MODELS:
            if not upstream.is_upstream_source(model):
                raise ValueError(
                    f"unknown model {model!r} (choose from {', '.join(hub.MODELS)}, or give a Hugging Face "
                    "repo id or a folder with model_config.json)"
                )
            self.upstream = upstream.load(model, progress=progress)
            if not self.upstream.is_generator:
                raise ValueError(f"{model} is a codec (model_type 'autoencoder'), not a generator")
            own_codec = self.upstream.codec.name
            if codec_name is not None and codec_name != own_codec:
                raise ValueError(f"{model} carries its own codec ({own_codec}); another one cannot be chosen")
            spec = self.upstream.sampling
            self.defaults = ModelDefaults(spec.default_steps, spec.default_cfg, spec.default_sampler)
            model = str(model)
        self.model_name = model
        self.codec_name = codec_name or (self.upstream.codec.name if self.upstream else hub.MODELS[model].codec)
        self.loras = LoraStack.from_specs(loras)
        self._dit_base: dict | None = None  # unmerged official DiT weights, kept while LoRAs are in use
        self.weights_dir = weights_dir
        self.progress = progress
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        self.dit_dtype = dit_dtype or (mx.float16 if on_gpu else mx.float32)
        # Codecs: fp32, except SAME-L on a GPU, which runs fp16 (69 dB PSNR against fp32 on the
        # reference case, 4.8x faster on an H100; the official runner also reports SAME-L fine
        # in fp16). SAME-S stays fp32: its differential attention cancels in fp16 with the
        # real weights (official runner), and it is cheap anyway.
        self.codec_dtype = codec_dtype or (mx.float16 if on_gpu and self.codec_name == "same-l" else mx.float32)
        # mx.compile fuses each sampler step into one graph: a large win on GPUs, none on CPUs.
        self.compile_steps = {"0": False, "1": True}.get(os.environ.get("SA3_COMPILE", ""), on_gpu)
        self._compiled: dict = {}  # step functions compiled for the current DiT, see _step_function
        self._text = None  # (encoder, tokenizer)
        self._dit: DiT | None = None
        self._conditioner: Conditioner | None = None
        self._decoder = None
        self._encoder = None
        self.stages: list[StageStats] = []
        self.on_stage: Callable[[StageStats], None] | None = None  # called as each stage ends

    # ---- loading ---------------------------------------------------------
    def _path(self, name: str) -> Path:
        return hub.resolve(name, self.weights_dir, progress=self.progress)

    def fetch(self, encoder: bool = False) -> list[Path]:
        """Make sure every file a run needs is local (downloads before any clock starts)."""
        if self.upstream is not None:
            return []  # fetched when the model was opened
        return [self._path(f) for f in hub.files_for(self.model_name, self.codec_name, encoder)]

    @property
    def prompt_tokens(self) -> int:
        """T5 sequence length: the model config's ``max_length``, or the official runners' 256."""
        return self.upstream.text.max_length if self.upstream is not None else PROMPT_TOKENS

    @property
    def text(self):
        if self._text is None:
            if self.upstream is not None:
                self._text = self.upstream.load_text(dtype=mx.float32)
            else:
                encoder, tokenizer, _ = load_t5gemma(self._path(hub.T5GEMMA_FILE), dtype=mx.float32)
                self._text = (encoder, tokenizer)
        return self._text

    def _load_dit(self) -> None:
        self._load_dit_weights()
        self.adopt_dit(self._dit)

    def adopt_dit(self, dit: DiT) -> None:
        """Use ``dit``, laid out for this device (CPU fp32: weights stored for plain BLAS products)."""
        if mx.default_device() == mx.cpu and self.dit_dtype == mx.float32:
            store_linear_weights_transposed(dit)
        self._dit = dit

    def _load_dit_weights(self) -> None:
        if self.upstream is not None:
            weights = self.loras.apply(self.upstream.dit_weights) if self.loras.files else None
            self._dit, self._conditioner = self.upstream.load_dit(self.dit_dtype, weights)
            return
        path = self._path(hub.MODELS[self.model_name].dit_file)
        if not self.loras.files:
            self._dit, _, cond_weights = load_dit(path, dtype=self.dit_dtype)
        else:
            # Merging needs the stored (unquantized) tensors; kept so strengths can change.
            if self._dit_base is None:
                npz = NpzWeights(path)
                self._dit_base = {k: npz[k] for k in npz}
                npz.close()
            merged = WeightDict(self.loras.apply(self._dit_base), path.name)
            self._dit, _, cond_weights = load_dit(merged, dtype=self.dit_dtype)
        self._conditioner = load_conditioner(cond_weights, path.name)

    def set_lora_strength(self, strength: float, index: int | None = None) -> None:
        """Strength of every LoRA (``index`` None) or of one; the DiT is re-merged on next use.

        The base weights stay in memory, so only the merge and the DiT build are redone.
        """
        if not self.loras.files:
            raise ValueError("no LoRA is loaded")
        if index is not None and not 0 <= index < len(self.loras.files):
            raise ValueError(f"LoRA index {index} out of range (0..{len(self.loras.files) - 1})")
        self.loras.set_strength(strength, index)
        self.free("dit")

    @property
    def dit(self) -> DiT:
        if self._dit is None:
            self._load_dit()
        return self._dit

    @property
    def conditioner(self) -> Conditioner:
        if self._conditioner is None:
            self._load_dit()
        return self._conditioner

    def _load_codec(self, role: str):
        if self.upstream is not None:
            return self.upstream.load_codec(role, dtype=self.codec_dtype)
        return load_same(self._path(hub.codec_file(self.codec_name, role)), role=role, dtype=self.codec_dtype)

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = self._load_codec("decoder")
        return self._decoder

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self._load_codec("encoder")
        return self._encoder

    def free(self, *parts: str) -> None:
        """Drop loaded models ("text", "dit", "decoder", "encoder"; none given = all)."""
        for part in parts or ("text", "dit", "decoder", "encoder"):
            if part == "dit":
                self._dit = self._conditioner = None
                self._compiled.clear()  # compiled steps hold the DiT
            else:
                setattr(self, f"_{part}", None)
        _free()

    # ---- stages --------------------------------------------------------------
    def _stage(self, name: str, start: float) -> None:
        mx.synchronize()
        stats = StageStats(name, time.perf_counter() - start, _peak_memory())
        self.stages.append(stats)
        mx.reset_peak_memory()
        if self.on_stage is not None:
            self.on_stage(stats)

    def _load_timed(self, label: str, attribute: str, load: Callable[[], object]) -> None:
        """Load a model now (if not yet loaded) and record it as its own stage."""
        if getattr(self, attribute) is None:
            t0 = time.perf_counter()
            load()
            self._stage(label, t0)

    def _check_widths(self) -> None:
        """The text encoder, conditioner and DiT must agree on the conditioning width."""
        encoder, _ = self.text
        widths = {
            "T5Gemma hidden size": encoder.config.hidden_size,
            "conditioner width (cond.*)": self.conditioner.config.cond_dim,
            "DiT cross-attention input": self.dit.config.cond_token_dim,
            "DiT global-conditioning input": self.dit.config.global_cond_dim,
        }
        if len(set(widths.values())) != 1:
            detail = ", ".join(f"{k} {v}" for k, v in widths.items())
            raise ValueError(f"the weight files do not belong together: {detail}")

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[mx.array, mx.array]:
        """T5Gemma embeddings ``[B, S, C]`` (zero past the longest prompt) and their mask ``[B, S]``
        (S = :attr:`prompt_tokens`)."""
        encoder, tokenizer = self.text
        ids, mask = (np.asarray(a) for a in tokenizer.encode(list(prompts), max_length=self.prompt_tokens))
        # Padding is on the right and masked out of every real token's attention, and
        # the conditioner replaces the pad positions' outputs; so encoding only up to
        # the longest prompt gives the same embeddings (a short prompt: ~10x faster).
        used = max(1, int(mask.sum(axis=1).max()))
        embeds = encoder(mx.array(ids[:, :used]), mx.array(mask[:, :used]))
        if used < ids.shape[1]:
            embeds = mx.pad(embeds, [(0, 0), (0, ids.shape[1] - used), (0, 0)])
        return embeds, mx.array(mask)

    def conditioning(
        self, prompt: str, negative_prompt: str | None, seconds: float, guidance: Guidance
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """``(cross_attn_cond [1,S+1,C], global_cond [1,C], uncond_cross_attn or None)``."""
        self._check_widths()
        prompts = [prompt] + ([negative_prompt] if guidance.enabled and negative_prompt is not None else [])
        embeds, mask = self.encode_prompts(prompts)
        cross, global_cond = self.conditioner.build(embeds[:1], mask[:1], [seconds])
        uncond = None
        if guidance.enabled:
            if negative_prompt is not None:
                # Upstream zeroes the negative prompt's pad positions (not the learned embedding).
                uncond, _ = self.conditioner.build(embeds[1:], mask[1:], [seconds], padding="zeros")
            else:
                uncond = mx.zeros_like(cross)  # upstream's null condition: every token zero
        return cross, global_cond, uncond

    def _step_function(self, key, make: Callable[[], Callable]) -> Callable:
        """A per-step function, compiled once per DiT and kept across generations (GPU).

        Compiling traces the function; a fresh ``mx.compile`` every generation would
        retrace it every time, which costs more than a step.
        """
        if not self.compile_steps:
            return make()
        return self._kept_for_dit(key, lambda: mx.compile(make()))

    def _block_functions(self) -> list[Callable]:
        """The DiT's blocks as callables for block-by-block steps: compiled where steps are
        (one trace per block, kept across generations), else the blocks themselves."""
        blocks = self.dit.transformer.layers
        if not self.compile_steps:
            return list(blocks)
        return self._kept_for_dit("blocks", lambda: [mx.compile(block) for block in blocks])

    def _kept_for_dit(self, key, make: Callable[[], object]) -> object:
        """``make()``, built once per DiT (compiled functions hold the DiT they traced)."""
        cached = self._compiled.get(key)
        if cached is None or cached[0] is not self.dit:
            cached = self._compiled[key] = (self.dit, make())
        return cached[1]

    def sample(
        self,
        noise: mx.array,
        sigmas: mx.array,
        cross: mx.array,
        global_cond: mx.array,
        uncond: mx.array | None,
        guidance: Guidance,
        step_noise: Callable[[int, tuple[int, ...], mx.Dtype], mx.array],
        local_cond: mx.array | None = None,
        on_step: Callable[[int, int], None] | None = None,
        padding_mask: mx.array | None = None,
        sampler: str = "pingpong",
    ) -> mx.array:
        """Sample a batch from its starting noise; CFG runs cond and uncond in one forward.

        What does not change across steps (context and global projections, local
        conditioning embeddings) is computed once here, not in every step.
        ``padding_mask`` [1|B, T] (1 = valid latent) hides padded latents from the
        self-attention; ``sampler`` is a key of ``sampling.SAMPLERS``.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        dit = self.dit
        batch = noise.shape[0]

        def expand(a: mx.array | None) -> mx.array | None:
            return None if a is None else mx.broadcast_to(a, (batch, *a.shape[1:]))

        def as_inputs(c: DiTConditioning) -> tuple:
            # The value mask only when there is one: mx.compile takes arrays, not None.
            return (c.context_kv, c.global_embed, c.local_embeds) + (() if c.value_mask is None else (c.value_mask,))

        mask = expand(padding_mask)
        cond = as_inputs(dit.condition(expand(cross), expand(global_cond), local_cond, mask))
        if uncond is not None:
            pair = as_inputs(dit.condition(
                mx.concatenate([expand(cross), expand(uncond)]),
                mx.concatenate([expand(global_cond)] * 2),
                None if local_cond is None else mx.concatenate([expand(local_cond)] * 2),
                None if mask is None else mx.concatenate([mask] * 2),
            ))

        # A long clip's step, run as one graph, holds every block's activations at once
        # (3.7 GB above the weights for the medium model at 120 s, 9 GB at 380 s on an
        # H100, measured): then the blocks run one after another, each compiled.
        rows = batch * (2 if uncond is not None else 1)
        if dit.step_activation_bytes(noise.shape[-1], rows) > STEP_MEMORY:
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

        steps = sigmas.shape[0] - 1
        x = noise.astype(self.dit_dtype)
        for i, x in enumerate(SAMPLERS[sampler](velocity, x, sigmas, step_noise), start=1):
            if on_step is not None:
                on_step(i, steps)
        return x

    # ---- the whole run -------------------------------------------------------------
    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dit_dtype]

    @property
    def codec_dtype_name(self) -> str:
        return DTYPE_NAMES[self.codec_dtype]

    def plan(
        self,
        prompt: str,
        seconds: float,
        init_audio: np.ndarray | None = None,
        inpaint: Sequence[tuple[float, float]] = (),
        init_noise_level: float | None = None,
        headroom: float = 0.0,
    ) -> "GenerationPlan":
        """Validate the settings and work out the mode, the length and the regions to regenerate.

        ``headroom`` > 0 uses upstream ``generate()``'s length rule (``duration_padding_sec``):
        ``seconds + headroom`` of latents, chunk-aligned, of which only the first
        ``valid_latents`` are visible to the DiT's self-attention.
        """
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a positive number (got {seconds})")
        if not (headroom >= 0 and math.isfinite(headroom)):
            raise ValueError(f"headroom must be >= 0 seconds (got {headroom})")
        inpaint = [(float(a), float(b)) for a, b in inpaint]
        for start, end in inpaint:
            if not 0 <= start < end <= seconds:
                raise ValueError(f"inpaint range {start:g}-{end:g} s must satisfy 0 <= start < end <= {seconds:g}")
        if inpaint and init_audio is None:
            raise ValueError("inpainting needs init audio")
        warnings = []
        trained = self.upstream.training_seconds if self.upstream is not None else None
        if trained is not None and seconds > trained + 1e-6:
            warnings.append(f"{seconds:g} s is longer than the {trained:.0f} s this model was trained on; "
                            "quality may drop")
        mode = "text-to-audio"
        if init_audio is not None:
            init_audio = np.asarray(init_audio, dtype=np.float32)
            if init_audio.ndim != 2 or init_audio.shape[0] != 2 or init_audio.shape[1] == 0:
                raise ValueError(f"init audio must be [2, samples] with samples > 0 (got shape {init_audio.shape})")
            init_seconds = init_audio.shape[1] / SAMPLE_RATE
            if init_seconds < seconds - 0.5 / SAMPLE_RATE:
                # Continuation: the part past the end of the init audio is generated.
                inpaint.append((init_seconds, seconds))
                mode = "continuation" if len(inpaint) == 1 else "inpainting"
            else:
                mode = "inpainting" if inpaint else "audio-to-audio"
                if init_seconds > seconds + 0.5 / SAMPLE_RATE:
                    warnings.append(f"init audio is {init_seconds:.2f} s; only its first {seconds:g} s are used")
        if init_noise_level is None:
            init_noise_level = 0.9 if mode == "audio-to-audio" else 1.0
        if not init_noise_level >= MIN_NOISE_LEVEL:
            raise ValueError(f"init noise level must be >= {MIN_NOISE_LEVEL} (got {init_noise_level})")
        n_lat, valid = latent_length(seconds, self.codec_name), None
        if headroom > 0:
            spec = self.upstream.codec if self.upstream is not None else upstream.CodecSpec(self.codec_name[-1])
            n_lat, valid = upstream.latent_seconds_rule(seconds, headroom, spec)
        return GenerationPlan(mode, n_lat, float(init_noise_level), inpaint, warnings, valid)

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        seconds: float = 30.0,
        steps: int | None = None,
        seed: int = 0,
        cfg: float | None = None,
        apg: float = 1.0,
        init_audio: np.ndarray | None = None,
        init_noise_level: float | None = None,
        inpaint: Sequence[tuple[float, float]] = (),
        batch: int = 1,
        on_step: Callable[[int, int], None] | None = None,
        free_models: bool = False,
        headroom: float = 0.0,
        sampler: str | None = None,
    ) -> GenerationResult:
        """Generate ``batch`` clips (seeds ``seed``, ``seed + 1``, ...).

        ``init_audio`` ([2, samples] at 44.1 kHz) turns this into audio-to-audio;
        with ``inpaint`` ranges ``(start, end)`` in seconds, or when the init audio
        is shorter than ``seconds`` (continuation), only those parts are
        regenerated and the kept latents are pasted back exactly. ``steps``, ``cfg``
        and ``sampler`` default to the model's recommendation (:attr:`defaults`);
        ``headroom`` seconds > 0 follows upstream ``generate()``'s length rule and
        attention padding mask (see :meth:`plan`).
        """
        steps = self.defaults.steps if steps is None else steps
        cfg = self.defaults.cfg if cfg is None else cfg
        sampler = sampler or self.defaults.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        if batch < 1:
            raise ValueError(f"batch must be >= 1 (got {batch})")
        plan = self.plan(prompt, seconds, init_audio, inpaint, init_noise_level, headroom)
        guidance = Guidance(scale=cfg, apg=apg)
        self.stages = []
        mx.reset_peak_memory()

        self._load_timed("load text encoder", "_text", lambda: self.text)
        self._load_timed("load DiT", "_dit", lambda: self.dit)
        t0 = time.perf_counter()
        cross, global_cond, uncond = self.conditioning(prompt, negative_prompt, seconds, guidance)
        mx.eval(cross, global_cond, *([uncond] if uncond is not None else []))
        self._stage("text encoding", t0)
        if free_models:
            self.free("text")

        n_lat = plan.latents
        init_latents = None
        if init_audio is not None:
            self._load_timed("load encoder", "_encoder", lambda: self.encoder)
            t0 = time.perf_counter()
            init_latents = self._encode_init(init_audio, n_lat)
            mx.eval(init_latents)
            self._stage("init audio encoding", t0)
            if free_models:
                self.free("encoder")

        t0 = time.perf_counter()
        noise, step_noise = self.draw_noise([seed + i for i in range(batch)], n_lat)

        local_cond = keep = None
        if init_latents is not None and plan.inpaint:
            keep = mx.array(inpaint_keep_mask(plan.inpaint, seconds, n_lat))[None, None, :]
            # Inpaint conditioning: [mask, latents * mask] on channels, time-major for the DiT.
            local_cond = mx.concatenate([keep, init_latents * keep], axis=1).transpose(0, 2, 1)
        elif init_latents is not None:
            s = plan.init_noise_level
            noise = init_latents * (1.0 - s) + noise * s

        padding_mask = None
        if plan.valid_latents is not None and plan.valid_latents < n_lat:
            padding_mask = (mx.arange(n_lat) < plan.valid_latents)[None, :]
        shift = self.upstream.sampling.shift if self.upstream is not None else None
        # Length-dependent shifts see the effective length (upstream use_effective_length_for_schedule).
        effective_latents = math.ceil(int(seconds * SAMPLE_RATE) / SAMPLES_PER_LATENT)
        sigmas = build_schedule(steps, plan.init_noise_level, shift, effective_latents)
        latents = self.sample(noise, sigmas, cross, global_cond, uncond, guidance, step_noise, local_cond, on_step,
                              padding_mask, sampler)
        if keep is not None:
            latents = paste_back(latents, init_latents, keep)
        latents = latents.astype(mx.float32)
        mx.eval(latents)
        self._stage("sampling", t0)
        if free_models:
            self.free("dit")

        self._load_timed("load decoder", "_decoder", lambda: self.decoder)
        t0 = time.perf_counter()
        audio = codec.unpatchify(codec.decode(self.decoder, latents.astype(self.codec_dtype))).astype(mx.float32)
        mx.eval(audio)
        self._stage("decoding", t0)
        if free_models:
            self.free("decoder")

        n_samples = int(round(seconds * SAMPLE_RATE))
        audio_np = np.array(audio[..., :n_samples])
        if plan.valid_latents is not None:
            audio_np[..., plan.valid_latents * SAMPLES_PER_LATENT:] = 0  # upstream zeroes the padded tail
        settings = dict(
            model=self.model_name, codec=self.codec_name, prompt=prompt, negative_prompt=negative_prompt,
            seconds=seconds, steps=steps, seed=seed, cfg=cfg, apg=apg, mode=plan.mode,
            init_noise_level=plan.init_noise_level, inpaint=[list(r) for r in plan.inpaint], batch=batch,
            latents=n_lat, dit_dtype=self.dtype_name, codec_dtype=self.codec_dtype_name,
            sampler=sampler, headroom=headroom, loras=self.loras.describe(),
        )
        return GenerationResult(audio_np, SAMPLE_RATE, settings, np.array(latents), list(self.stages))

    def draw_noise(self, seeds: Sequence[int], n_lat: int) -> tuple[mx.array, Callable]:
        """``(initial noise [B, 256, n_lat], step_noise(i, shape, dtype))`` for a batch of seeds.

        Per item: initial noise from key(seed), step noise from key(seed + 1) splits,
        so item i equals a single run with seed + i.
        """
        noise = mx.concatenate(
            [mx.random.normal((1, codec.LATENT_CHANNELS, n_lat), key=mx.random.key(s)) for s in seeds]
        )
        streams = [seeded_step_noise(s + 1) for s in seeds]

        def step_noise(i: int, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
            return mx.concatenate([draw(i, (1, *shape[1:]), dtype) for draw in streams])

        return noise, step_noise

    def _encode_init(self, audio: np.ndarray, n_lat: int) -> mx.array:
        """Encode [2, samples] init audio (validated by :meth:`plan`) to ``[1, 256, n_lat]`` latents,
        trimmed or padded with silence to the latent grid."""
        n_samples = n_lat * SAMPLES_PER_LATENT
        audio = np.asarray(audio, dtype=np.float32)[:, :n_samples]
        audio = np.pad(audio, ((0, 0), (0, n_samples - audio.shape[1])))
        latents = codec.encode(self.encoder, mx.array(audio[None]).astype(self.codec_dtype)).astype(mx.float32)
        return latents[..., :n_lat]
