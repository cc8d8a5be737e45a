"""One object holding the models: prompt -> conditioning -> sampling -> decoding.

``Pipeline`` holds one :class:`~sa3_mlx.sources.ModelSource` and the models it loaded
from it (text encoder, DiT with its conditioner, the codec halves a run needs), and
generates as many times as asked with the models resident. :meth:`Pipeline.run` is a
generator of :class:`Event`\\ s (stage started/ended with its time and peak memory,
sampling step k of n, the result): front ends draw progress from them, and stopping
the iteration cancels the run at the next step.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import codec, kernels
from .audio import SAMPLE_RATE, read_audio
from .conditioning import Conditioner, PromptEncoder
from .denoiser import Denoiser, GatedDenoiser
from .lora import LoraStack
from .models.dit import DiT
from .plan import GenerationPlan, inpaint_keep_mask, make_plan
from .sampling import Guidance, paste_back, seeded_step_noise
from .settings import DTYPES as DTYPE_CHOICES
from .quantize import Quantization, float_view
from .quantize import spec as quantization_spec
from .settings import MODEL_DEFAULT, GenerationSettings, batch_shape, check_sampler, draw_seed, validate, variation_seed
from .sources import ModelSource, open_source

DTYPES = dict(zip(DTYPE_CHOICES, (mx.float32, mx.float16, mx.bfloat16), strict=True))
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The stages of a run, in order (a stage that has nothing to do is skipped).
LOAD_TEXT, TEXT_ENCODING, LOAD_DIT = "load text encoder", "text encoding", "load DiT"
TEXT_CACHE_ENTRIES = 32
LOAD_ENCODER, INIT_ENCODING = "load encoder", "init audio encoding"
SAMPLING, LOAD_DECODER, DECODING = "sampling", "load decoder", "decoding"
STAGES = (LOAD_TEXT, TEXT_ENCODING, LOAD_DIT, LOAD_ENCODER, INIT_ENCODING, SAMPLING, LOAD_DECODER, DECODING)
MODEL_PARTS = ("text", "dit", "decoder", "encoder")


@dataclass
class StageStats:
    name: str
    seconds: float
    peak_bytes: int


@dataclass
class GenerationResult:
    audio: np.ndarray  # [batch, 2, samples] float32, not clipped
    sample_rate: int
    settings: GenerationSettings  # as run: the model's defaults and the pipeline's own choices filled in
    plan: GenerationPlan
    latents: np.ndarray  # [batch, 256, T] the sampled latents
    stages: list[StageStats] = field(default_factory=list)
    codec: str = ""  # the codec that decoded it (a release's own, or the settings' decoder)

    @property
    def seeds(self) -> list[int]:
        return [self.settings.variation_seed(i) for i in range(len(self.audio))]


# ---- events -----------------------------------------------------------------------------------


@dataclass
class StageStarted:
    name: str


@dataclass
class StageEnded:
    stats: StageStats


@dataclass
class Step:
    done: int
    total: int


@dataclass
class Preview:
    """After step ``done``: the audio that the clean latents of the latest model evaluation decode to (the
    samplers run one step ahead: for pingpong, euler and dpmpp, the prediction from the state after step
    ``done``), first output only, ``[2, samples]``, and the decode's seconds (``Pipeline.run(preview_every=N)``)."""

    done: int
    total: int
    audio: np.ndarray
    seconds: float


@dataclass
class Finished:
    result: GenerationResult


Event = StageStarted | StageEnded | Step | Preview | Finished


def _peak_memory() -> int:
    return int(mx.get_peak_memory())


def _free() -> None:
    gc.collect()
    mx.clear_cache()


def parameter_bytes(module) -> int:
    """Bytes of a module's tensors (a quantized layer's packed weight, scales and biases included)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def dtype_of(name: str | None) -> mx.Dtype | None:
    return None if name is None else DTYPES[name]


def guidance_of(s: GenerationSettings) -> Guidance:
    """The guidance settings of (resolved) ``s``."""
    return Guidance(scale=s.cfg, apg=s.apg, interval=tuple(s.cfg_interval), rescale=s.cfg_rescale,
                    norm_threshold=s.cfg_norm_threshold)


class Pipeline:
    """Stable Audio 3 text-to-audio, audio-to-audio and inpainting with resident models.

    ``model`` is one of ``hub.MODELS`` (``sm-music``, ``sm-sfx``, ``medium``: the
    official MLX files) or an original PyTorch release (a Hugging Face repo id such as
    ``stabilityai/stable-audio-3-small-music``, or a local folder with
    ``model_config.json`` or one written by ``sa3 convert``); or pass a ready ``source``
    (:mod:`sa3_mlx.sources`). ``codec_name`` defaults to the one it was trained with.
    Files come from ``weights_dir`` when given, otherwise from the Hugging Face cache
    (downloaded on first use). ``dit_dtype`` defaults to float32 on the CPU (MLX's
    half-precision matmul is slow there) and float16 on a GPU. ``loras``:
    ``"FILE[:STRENGTH]"`` (or ``(path, strength)``) adapters in the upstream format,
    stacked in order and merged into the DiT (:meth:`set_lora_strength` changes them).
    ``quantize`` (:class:`~sa3_mlx.quantize.Quantization`): the DiT's transformer-block linear layers
    quantized to 8 or 4 bits as they load (a source whose files are quantized loads as they are).
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
        source: ModelSource | None = None,
        compile_steps: bool | None = None,
        quantize: Quantization | None = None,
    ):
        self.source = source if source is not None else open_source(model, weights_dir, progress)
        stored = getattr(self.source, "quantization", None)  # files written quantized (sa3 convert --quantize)
        if stored is not None and quantize is not None and quantize != stored:
            raise ValueError(f"{self.source.name} is stored quantized {stored}; it loads only as it is "
                             f"(leave out the quantization), not as {quantize}")
        self.quantize = quantize or stored
        self.codec_name = codec_name or self.source.codec
        if self.codec_name not in self.source.codecs:
            raise ValueError(f"{self.source.name} carries its own codec ({self.source.codec}); "
                             "another one cannot be chosen")
        self.loras = LoraStack.from_specs(loras)
        self._lora_base: Mapping | None = None  # the stored DiT tensors (a lazy file view where the source has one)
        self._merged_keys: set[str] = set()  # the DiT tensors the loaded DiT holds merged
        self.dit_dtype = dit_dtype or (mx.float16 if on_gpu() else mx.float32)
        # Codecs: fp32, except SAME-L on a GPU, which runs fp16 (69 dB PSNR against fp32 on the
        # reference case, 4.8x faster on an H100; the official runner also reports SAME-L fine
        # in fp16). SAME-S stays fp32: its differential attention cancels in fp16 with the
        # real weights (official runner), and it is cheap anyway.
        self.codec_dtype = codec_dtype or (mx.float16 if on_gpu() and self.codec_name == "same-l" else mx.float32)
        self.kernels = kernels.for_device()  # chosen once: every model op of this pipeline runs through it
        self.compile_steps = compile_steps
        self._text: PromptEncoder | None = None
        # Prompt embeddings of the last prompts (LRU): the same prompt again (a batch of seeds, the studio's
        # next variation) needs neither the text encoder nor its load. ~1 MB a prompt; 0 turns it off.
        self.text_cache_entries = TEXT_CACHE_ENTRIES
        self._text_cache: OrderedDict[tuple, tuple] = OrderedDict()
        self._dit: DiT | None = None
        self._conditioner: Conditioner | None = None
        self._denoiser: Denoiser | None = None
        self._gated: dict[frozenset, Denoiser] = {}  # LoRA gating: one DiT per set of active LoRAs
        self._decoder = None
        self._encoder = None
        self.stages: list[StageStats] = []
        self.weight_bytes: dict[str, int] = {}  # bytes of each loaded part's tensors ("text", "dit", ...)

    @classmethod
    def from_settings(cls, settings: GenerationSettings, weights_dir=None, progress: bool = True) -> "Pipeline":
        """The pipeline the model settings of ``settings`` ask for (model or release, decoder, dtypes, LoRAs)."""
        return cls(settings.model_name, settings.decoder, weights_dir=weights_dir,
                   dit_dtype=dtype_of(settings.dit_dtype), codec_dtype=dtype_of(settings.codec_dtype),
                   progress=progress, loras=settings.loras,
                   quantize=quantization_spec(settings.quantize, settings.quantize_group_size))

    # ---- what the pipeline is ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def defaults(self):
        return self.source.defaults

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dit_dtype]

    @property
    def codec_dtype_name(self) -> str:
        return DTYPE_NAMES[self.codec_dtype]

    def key(self) -> tuple:
        """What identifies the loaded models (a front end reuses a pipeline with the same key)."""
        return self.base_key() + (tuple(self.lora_specs),)

    def base_key(self) -> tuple:
        """What identifies the models before any LoRA (:meth:`set_loras` changes the rest in place)."""
        return (self.model_name, self.codec_name, self.dtype_name, self.codec_dtype_name, self.quantize)

    @property
    def quantize_name(self) -> str | None:
        """The DiT's quantization in the settings' words (``"4"``), None when not quantized."""
        return None if self.quantize is None else str(self.quantize.bits)

    @property
    def lora_specs(self) -> list[str]:
        return self.loras.specs()

    def fetch(self, encoder: bool = False) -> list[Path]:
        """Make sure every file a run needs is local (downloads before any clock starts)."""
        return self.source.fetch(self.codec_name, encoder)

    # ---- the models, loaded on first use -------------------------------------------------------
    @property
    def text(self) -> PromptEncoder:
        if self._text is None:
            with kernels.use(self.kernels):
                encoder, tokenizer = self.source.load_text(mx.float32)
            self._text = PromptEncoder(encoder, tokenizer, self.source.prompt_tokens)
            self.weight_bytes["text"] = parameter_bytes(encoder)
        return self._text

    def _load_dit(self) -> None:
        weights = None
        self._merged_keys = set()
        if self.loras.files:
            # Merging starts from the stored tensors (a lazy view of the file: only the tensors a LoRA
            # changes are read); a quantized DiT quantizes the merged weights as it loads them.
            weights = self.loras.apply(self._stored_dit())
            self._merged_keys = set(weights.changes)
        with kernels.use(self.kernels):  # the loader lays the weights out for this backend as it reads them
            dit, conditioner = self.source.load_dit(self.dit_compute_dtype, weights, self.quantize)
        self.kernels.prepare(dit, self.dit_dtype)  # modules built in memory (random weights) get the same layout here
        self._dit, self._conditioner = dit, conditioner
        self.weight_bytes["dit"] = parameter_bytes(dit)
        self._denoiser = Denoiser(dit, self.compile_steps)
        self._check_widths()

    @property
    def dit_compute_dtype(self) -> mx.Dtype:
        """What the DiT is loaded and run in: ``dit_dtype``, or fp32 where the kernels backend runs that
        precision's products from fp32 activations (bf16 on CPUs with oneDNN: ``Kernels.compute_dtype``)."""
        return self.kernels.compute_dtype(self.dit_dtype)

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

    @property
    def denoiser(self) -> Denoiser | GatedDenoiser:
        """The sampler's model: with LoRAs active at some noise levels only (``FILE:S@LO-HI``), a
        :class:`GatedDenoiser` that runs each step with the DiT of the LoRAs active at its level."""
        if self._denoiser is None:
            self._load_dit()
        if not self.loras.gated:
            return self._denoiser
        return GatedDenoiser(lambda level: self._gated_denoiser(self.loras.active_at(level)))

    def _gated_denoiser(self, active: frozenset) -> Denoiser:
        """The DiT (weight set) of the LoRAs in ``active``, merged once and kept while the DiT is loaded."""
        if active == frozenset(range(len(self.loras.files))):
            return self._denoiser
        if active not in self._gated:
            weights = self.loras.subset(active).apply(self._stored_dit())
            with kernels.use(self.kernels):
                dit, _ = self.source.load_dit(self.dit_compute_dtype, weights, self.quantize)
            self.kernels.prepare(dit, self.dit_dtype)
            self._gated[active] = Denoiser(dit, self.compile_steps)
        return self._gated[active]

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

    @property
    def codec_compute_dtype(self) -> mx.Dtype:
        """What the codec is loaded and run in: ``codec_dtype``, or what the kernels backend runs that precision
        from (bf16 on CPUs with oneDNN: fp32 activations, bf16 products; ``Kernels.compute_dtype``)."""
        return self.kernels.compute_dtype(self.codec_dtype)

    def _load_codec(self, role: str):
        dtype = self.codec_compute_dtype
        model = self.source.load_codec(self.codec_name, role, dtype)
        if dtype != self.codec_dtype:  # the backend's own form of the asked precision (bf16 linear layers)
            self.kernels.prepare(model, self.codec_dtype)
        self.weight_bytes[role] = parameter_bytes(model)
        return model

    def _decode(self, latents: mx.array) -> mx.array:
        """``[B, 256, T]`` latents -> ``[B, 2, 4096 T]`` float32 audio (lazy), the decoder run in its compute dtype."""
        return codec.unpatchify(codec.decode(self.decoder, latents.astype(self.codec_compute_dtype))).astype(mx.float32)

    def _stored_dit(self) -> Mapping:
        if self._lora_base is None:
            self._lora_base = float_view(self.source.dit_weights())  # a quantized file: dequantized
        return self._lora_base

    def set_lora_strength(self, strength: float, index: int | None = None) -> None:
        """Strength of every LoRA (``index`` None) or of one, merged into the loaded DiT in place
        (:meth:`_remerge`: only the tensors the adapters change are read, merged and, for a quantized
        DiT, quantized again)."""
        if not self.loras.files:
            raise ValueError("no LoRA is loaded")
        if index is not None and not 0 <= index < len(self.loras.files):
            raise ValueError(f"LoRA index {index} out of range (0..{len(self.loras.files) - 1})")
        self.loras.set_strength(strength, index)
        self._remerge()

    def set_loras(self, specs: Sequence) -> None:
        """Other adapters, strengths, noise intervals or options, without reloading the base model: the
        text encoder and codecs stay, and the loaded DiT takes the new merge in place (:meth:`_remerge`).
        An empty list goes back to the plain DiT."""
        loras = LoraStack.from_specs(specs)
        if loras.specs() == self.loras.specs():
            return
        self.loras = loras
        self._remerge()

    def _remerge(self) -> None:
        """Bring the loaded DiT to the current LoRAs: the tensors the new merge changes, and those the
        old one had changed (back to their stored values), are replaced in place, one at a time, through
        the strict loader's conversions (quantized again when the DiT is quantized); nothing else is read.
        Gated LoRAs, or a change of the conditioner's tensors, rebuild the DiT on next use instead."""
        if self._dit is None or self._gated or self.loras.gated:
            self.free("dit")
            return
        from .models.dit import COND_PREFIX
        from .weights import update_strict

        base = self._stored_dit()
        merged = self.loras.apply(base).changes if self.loras.files else {}
        keys = set(merged) | self._merged_keys
        if any(k.startswith(COND_PREFIX) for k in keys):
            self.free("dit")
            return
        changes = {k: merged[k] if k in merged else base[k] for k in sorted(keys)}
        with kernels.use(self.kernels):
            update_strict(self._dit, changes, getattr(base, "name", self.model_name), self.dit_dtype,
                          self.kernels.linear_weight_layout(self.dit_dtype))
        self._merged_keys = set(merged)
        self._denoiser = Denoiser(self._dit, self.compile_steps)  # compiled steps hold the old tensors
        if not self.loras.files:
            self._lora_base = None
        _free()

    def free(self, *parts: str) -> None:
        """Drop loaded models ("text", "dit", "decoder", "encoder"; none given = all)."""
        for part in parts or MODEL_PARTS:
            if part not in MODEL_PARTS:
                raise ValueError(f"unknown model part {part!r} (choose from {', '.join(MODEL_PARTS)})")
            if part == "dit":
                self._dit = self._conditioner = self._denoiser = None  # the denoiser's compiled steps hold the DiT
                self._gated = {}
            else:
                setattr(self, f"_{part}", None)
        _free()

    def _check_widths(self, text_width: int | None = None) -> None:
        """The text encoder, conditioner and DiT must agree on the conditioning width."""
        widths = {
            "conditioner width (cond.*)": self._conditioner.config.cond_dim,
            "DiT cross-attention input": self._dit.config.cond_token_dim,
            "DiT global-conditioning input": self._dit.config.global_cond_dim,
        }
        if text_width is None and self._text is not None:
            text_width = self._text.width
        if text_width is not None:
            widths["T5Gemma hidden size"] = text_width
        if len(set(widths.values())) != 1:
            detail = ", ".join(f"{k} {v}" for k, v in widths.items())
            raise ValueError(f"the weight files do not belong together: {detail}")

    # ---- settings and plan ---------------------------------------------------------------------
    def settings(self, prompt: str = "", **values) -> GenerationSettings:
        """Checked settings from keyword values (the Python API's spelling of a request);
        ``batch`` is accepted for ``num_outputs``. Models stay loaded unless ``free_models=True``."""
        if "batch" in values:
            values["num_outputs"] = values.pop("batch")
        values.setdefault("free_models", False)  # a loaded pipeline keeps its models (the studio's default too)
        return validate(dict(values, prompt=prompt))

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` as this pipeline runs them: the model's defaults for steps, cfg and sampler,
        a seed when none was given, and the pipeline's own model, codec, dtypes and LoRAs.

        A sampler that the model's objective does not take is a :class:`SettingsError` (``sampler``)."""
        d = self.source.defaults
        if settings.sampler != MODEL_DEFAULT:
            check_sampler(settings.sampler, d.objective, self.source.name)
        release = self.source.name if self.source.is_release else None
        return settings.replace(
            steps=d.steps if settings.steps == MODEL_DEFAULT else settings.steps,
            cfg=d.cfg if settings.cfg == MODEL_DEFAULT else settings.cfg,
            sampler=d.sampler if settings.sampler == MODEL_DEFAULT else settings.sampler,
            seed=draw_seed() if settings.seed is None else settings.seed,
            model=None if release else self.source.name, release=release, decoder=None if release else self.codec_name,
            dit_dtype=self.dtype_name, codec_dtype=self.codec_dtype_name, loras=tuple(self.lora_specs),
            quantize=self.quantize_name,
            quantize_group_size=None if self.quantize is None else str(self.quantize.group_size),
        )

    def plan(self, settings: GenerationSettings, init_audio: np.ndarray | None = None) -> GenerationPlan:
        """The mode, length and regions to regenerate of a run (checks the init audio's shape)."""
        settings = self.resolve(settings)
        plan = make_plan(settings, self.source, self.codec_name, init_audio)
        if settings.negative_prompt is not None and settings.cfg == 1:
            plan.warnings.append("the negative prompt is ignored while cfg is 1 (guidance off)")
        return plan

    # ---- the run ---------------------------------------------------------------------------------
    def _stage(self, name: str, work: Callable[[], object]) -> Iterator[Event]:
        """Run ``work`` as one stage: start and end events, wall time and peak memory; returns its value."""
        yield StageStarted(name)
        mx.reset_peak_memory()  # each stage's own peak (what an earlier stage freed is not counted)
        t0 = time.perf_counter()
        value = work()
        mx.synchronize()
        stats = StageStats(name, time.perf_counter() - t0, _peak_memory())
        self.stages.append(stats)
        mx.reset_peak_memory()
        yield StageEnded(stats)
        return value

    def _load_stage(self, name: str, part: str) -> Iterator[Event]:
        if getattr(self, f"_{part}") is None:
            yield from self._stage(name, lambda: getattr(self, part))

    def run(self, settings: GenerationSettings, init_audio: np.ndarray | None = None,
            preview_every: int = 0) -> Iterator[Event]:
        """Generate ``settings.num_outputs`` clips (seeds ``seed``, ``seed + 1``, ...), as events.

        ``init_audio`` ([2, samples] at 44.1 kHz) turns this into audio-to-audio; with
        inpaint ranges, or when the init audio is shorter than ``seconds``
        (continuation), only those parts are regenerated and the kept latents are
        pasted back exactly. The last event is :class:`Finished` with the result;
        closing the generator early stops the run at the next step. ``preview_every`` N > 0: after every
        N-th step but the last, a :class:`Preview` of what that step predicts (the decoder is loaded for it).
        """
        with kernels.use(self.kernels):
            result = yield from self._run(self.resolve(settings), init_audio, preview_every)
        yield Finished(result)

    def _run(self, s: GenerationSettings, init_audio: np.ndarray | None, preview_every: int = 0) -> Iterator[Event]:
        plan = make_plan(s, self.source, self.codec_name, init_audio)
        guidance = guidance_of(s)
        self.stages = []
        mx.reset_peak_memory()

        # The text encoder runs and (with free_models) is freed before the DiT loads: the two are
        # never resident together, which is what bounds a CLI run's peak memory.
        if not self.text_cached(s.prompt, s.negative_prompt, guidance):
            yield from self._load_stage(LOAD_TEXT, "text")

        def encode_text():
            embeds, mask, weights = self.encode_text(s.prompt, s.negative_prompt, guidance)
            mx.eval(embeds, mask, *([] if weights is None else [weights]))
            return embeds, mask, weights

        embeds, mask, weights = yield from self._stage(TEXT_ENCODING, encode_text)
        if s.free_models:
            self.free("text")
        yield from self._load_stage(LOAD_DIT, "dit")
        self._check_widths(text_width=embeds.shape[-1])

        n_lat = plan.latents
        init_latents = None
        if init_audio is not None:
            yield from self._load_stage(LOAD_ENCODER, "encoder")

            def encode_audio():
                latents = self.encode_init(init_audio, n_lat)
                mx.eval(latents)
                return latents

            init_latents = yield from self._stage(INIT_ENCODING, encode_audio)
            if s.free_models:
                self.free("encoder")

        yield StageStarted(SAMPLING)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        cross, global_cond, uncond = self.build_conditioning(embeds, mask, s.seconds, guidance,
                                                             s.negative_prompt is not None, weights)
        noise, step_noise = self.draw_noise([s.variation_seed(i) for i in range(s.num_outputs)], n_lat)
        local_cond = keep = None
        if init_latents is not None and plan.inpaint:
            keep = mx.array(inpaint_keep_mask(plan.inpaint, s.seconds, n_lat))[None, None, :]
            # Inpaint conditioning: [mask, latents * mask] on channels, time-major for the DiT.
            local_cond = mx.concatenate([keep, init_latents * keep], axis=1).transpose(0, 2, 1)
        elif init_latents is not None:
            level = plan.init_noise_level
            noise = init_latents * (1.0 - level) + noise * level
        padding_mask = None
        if plan.valid_latents is not None and plan.valid_latents < n_lat:
            padding_mask = (mx.arange(n_lat) < plan.valid_latents)[None, :]
        sigmas = mx.array(plan.sigmas, dtype=mx.float32)
        latents = None
        denoiser = self.denoiser
        states = denoiser.steps(noise, sigmas, cross, global_cond, uncond, guidance, step_noise, local_cond,
                                padding_mask, s.sampler, self.dit_compute_dtype)
        for i, latents in enumerate(states, start=1):
            yield Step(i, s.steps)
            if preview_every > 0 and i % preview_every == 0 and i < s.steps and denoiser.denoised is not None:
                yield self._preview(i, s.steps, denoiser.denoised[:1], s.seconds)
        del states, denoiser  # they hold the DiT (its compiled steps, the conditioning): free("dit") must free it
        if keep is not None:
            latents = paste_back(latents, init_latents, keep)
        latents = latents.astype(mx.float32)
        mx.eval(latents)
        if not mx.isfinite(latents).all().item():
            raise ValueError(f"sampling gave NaN or infinite latents: the DiT weights of {self.model_name} "
                             "hold non-finite values, or a setting overflows them (try --dit-dtype fp32)")
        stats = StageStats(SAMPLING, time.perf_counter() - t0, _peak_memory())
        self.stages.append(stats)
        mx.reset_peak_memory()
        yield StageEnded(stats)
        if s.free_models:
            self.free("dit")

        yield from self._load_stage(LOAD_DECODER, "decoder")

        def decode():
            audio = self._decode(latents)
            mx.eval(audio)
            return audio

        audio = yield from self._stage(DECODING, decode)
        if s.free_models:
            self.free("decoder")

        n_samples = int(round(s.seconds * SAMPLE_RATE))
        audio_np = self.kernels.to_numpy(audio[..., :n_samples])
        if plan.valid_latents is not None:
            audio_np[..., plan.valid_latents * codec.SAMPLES_PER_LATENT:] = 0  # upstream zeroes the padded tail
        s = s.replace(init_noise_level=plan.init_noise_level)
        return GenerationResult(audio_np, SAMPLE_RATE, s, plan, self.kernels.to_numpy(latents), list(self.stages), self.codec_name)

    def generate(
        self,
        prompt: str | None = None,
        *,
        settings: GenerationSettings | None = None,
        init_audio: np.ndarray | str | Path | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        **values,
    ) -> GenerationResult:
        """Run to the end and return the result (see :meth:`run`).

        Either ``settings``, or the prompt and settings as keywords (``seconds``, ``steps``,
        ``seed``, ``cfg``, ``inpaint``, ``num_outputs``, ... : the names of
        :data:`sa3_mlx.settings.FIELDS`). ``init_audio``: ``[2, samples]`` at 44.1 kHz or a file.
        """
        if settings is None and init_audio is not None:  # the settings record where the audio came from
            values.setdefault("init_audio", str(init_audio) if isinstance(init_audio, (str, Path)) else "<array>")
        if isinstance(init_audio, (str, Path)):
            init_audio = read_audio(init_audio)
        if settings is None:
            settings = self.settings("" if prompt is None else prompt, **values)
        elif prompt is not None or values:
            raise ValueError("pass either settings or the prompt and keyword settings, not both")
        result = None
        for event in self.run(settings, None if init_audio is None else np.asarray(init_audio, np.float32)):
            if on_event is not None:
                on_event(event)
            if on_step is not None and isinstance(event, Step):
                on_step(event.done, event.total)
            if isinstance(event, Finished):
                result = event.result
        return result

    def _preview(self, done: int, total: int, denoised: mx.array, seconds: float) -> Preview:
        t0 = time.perf_counter()
        latents = denoised.astype(mx.float32)
        audio = self._decode(latents)
        audio = self.kernels.to_numpy(audio[0, :, :int(round(seconds * SAMPLE_RATE))])
        return Preview(done, total, audio, time.perf_counter() - t0)

    def generate_many(self, items: Sequence[GenerationSettings]) -> list[GenerationResult]:
        """Several text-to-audio requests of one settings shape (:func:`sa3_mlx.settings.batch_shape`:
        they differ only in prompt, negative prompt, seed, number of outputs and output format) in one
        batched sampling and decoding: each item's output i equals its own run with seed + i, up to the
        rounding of batched matmuls. One item (or one with audio input) is :meth:`generate`."""
        items = [self.resolve(s) for s in items]
        if not items:
            return []
        if len(items) == 1:
            return [self.generate(settings=items[0])]
        if any(s.init_audio is not None for s in items):
            raise ValueError("generate_many batches text-to-audio only; run items with audio input one by one")
        if len({batch_shape(s) for s in items}) > 1:
            raise ValueError("generate_many needs items of one settings shape (see settings.batch_shape)")
        with kernels.use(self.kernels):
            return self._run_many(items)

    def _run_many(self, items: list[GenerationSettings]) -> list[GenerationResult]:
        def drain(stage):
            try:
                while True:
                    next(stage)
            except StopIteration as done:
                return done.value

        first = items[0]
        plan = make_plan(first, self.source, self.codec_name, None)
        guidance = guidance_of(first)
        self.stages = []
        mx.reset_peak_memory()
        if not all(self.text_cached(s.prompt, s.negative_prompt, guidance) for s in items):
            drain(self._load_stage(LOAD_TEXT, "text"))

        def encode_text():
            encoded = [self.encode_text(s.prompt, s.negative_prompt, guidance) for s in items]
            mx.eval([a for e in encoded for a in e if a is not None])
            return encoded

        encoded = drain(self._stage(TEXT_ENCODING, encode_text))
        if first.free_models:
            self.free("text")
        drain(self._load_stage(LOAD_DIT, "dit"))
        self._check_widths(text_width=encoded[0][0].shape[-1])
        n_lat = plan.latents

        mx.reset_peak_memory()
        t0 = time.perf_counter()
        parts = [self.build_conditioning(embeds, mask, s.seconds, guidance, s.negative_prompt is not None, weights)
                 for (embeds, mask, weights), s in zip(encoded, items)]

        def rows(index: int) -> mx.array:
            return mx.concatenate([mx.broadcast_to(p[index], (s.num_outputs, *p[index].shape[1:]))
                                   for p, s in zip(parts, items)])

        cross, global_cond = rows(0), rows(1)
        uncond = rows(2) if guidance.enabled else None
        seeds = [s.variation_seed(i) for s in items for i in range(s.num_outputs)]
        noise, step_noise = self.draw_noise(seeds, n_lat)
        padding_mask = None
        if plan.valid_latents is not None and plan.valid_latents < n_lat:
            padding_mask = (mx.arange(n_lat) < plan.valid_latents)[None, :]
        sigmas = mx.array(plan.sigmas, dtype=mx.float32)
        latents = None
        for latents in self.denoiser.steps(noise, sigmas, cross, global_cond, uncond, guidance, step_noise, None,
                                           padding_mask, first.sampler, self.dit_compute_dtype):
            pass
        latents = latents.astype(mx.float32)
        mx.eval(latents)
        if not mx.isfinite(latents).all().item():
            raise ValueError(f"sampling gave NaN or infinite latents: the DiT weights of {self.model_name} "
                             "hold non-finite values, or a setting overflows them (try --dit-dtype fp32)")
        self.stages.append(StageStats(SAMPLING, time.perf_counter() - t0, _peak_memory()))
        mx.reset_peak_memory()
        if first.free_models:
            self.free("dit")
        drain(self._load_stage(LOAD_DECODER, "decoder"))

        def decode():
            audio = self._decode(latents)
            mx.eval(audio)
            return audio

        audio = drain(self._stage(DECODING, decode))
        if first.free_models:
            self.free("decoder")
        audio_np = self.kernels.to_numpy(audio[..., :int(round(first.seconds * SAMPLE_RATE))])
        if plan.valid_latents is not None:
            audio_np[..., plan.valid_latents * codec.SAMPLES_PER_LATENT:] = 0
        latents_np = self.kernels.to_numpy(latents)
        results, start = [], 0
        for s in items:
            end = start + s.num_outputs
            results.append(GenerationResult(audio_np[start:end], SAMPLE_RATE, s.replace(init_noise_level=plan.init_noise_level),
                                            plan, latents_np[start:end], list(self.stages), self.codec_name))
            start = end
        return results

    def conditioning(
        self, prompt: str, negative_prompt: str | None, seconds: float, guidance: Guidance
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """``(cross_attn_cond [1,S+1,C], global_cond [1,C], uncond_cross_attn or None)``."""
        embeds, mask, weights = self.encode_text(prompt, negative_prompt, guidance)
        return self.build_conditioning(embeds, mask, seconds, guidance, negative_prompt is not None, weights)

    def encode_text(self, prompt: str, negative_prompt: str | None,
                    guidance: Guidance) -> tuple[mx.array, mx.array, mx.array | None]:
        """T5Gemma embeddings, mask and prompt-weighting weights (None: no weights) of the prompt (and
        the negative prompt when guidance uses it)."""
        key = self._text_key(prompt, negative_prompt, guidance)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        encoded = self.text.encode_weighted(list(key))
        if self.text_cache_entries > 0:
            mx.eval([a for a in encoded if a is not None])
            self._text_cache[key] = encoded
            while len(self._text_cache) > self.text_cache_entries:
                self._text_cache.popitem(last=False)
        return encoded

    @staticmethod
    def _text_key(prompt: str, negative_prompt: str | None, guidance: Guidance) -> tuple:
        return (prompt,) + ((negative_prompt,) if guidance.enabled and negative_prompt is not None else ())

    def text_cached(self, prompt: str, negative_prompt: str | None, guidance: Guidance) -> bool:
        """Whether :meth:`encode_text` has these prompts' embeddings (no text encoder needed)."""
        return self._text_key(prompt, negative_prompt, guidance) in self._text_cache

    def build_conditioning(self, embeds: mx.array, mask: mx.array, seconds: float, guidance: Guidance,
                           negative: bool, weights: mx.array | None = None
                           ) -> tuple[mx.array, mx.array, mx.array | None]:
        """The DiT's inputs from :meth:`encode_text`'s output (the conditioner is part of the DiT file)."""
        pick = (lambda rows: None) if weights is None else (lambda rows: weights[rows])
        cross, global_cond = self.conditioner.build(embeds[:1], mask[:1], [seconds], weights=pick(slice(0, 1)))
        uncond = None
        if guidance.enabled:
            if negative:
                # Upstream zeroes the negative prompt's pad positions (not the learned embedding).
                uncond, _ = self.conditioner.build(embeds[1:], mask[1:], [seconds], padding="zeros",
                                                   weights=pick(slice(1, None)))
            else:
                uncond = mx.zeros_like(cross)  # upstream's null condition: every token zero
        return cross, global_cond, uncond

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

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """The codec alone: ``[2, samples]`` audio at 44.1 kHz -> ``[256, ceil(samples / 4096)]`` float32
        latents, the audio completed with silence to a whole latent (``sa3 encode-audio``)."""
        audio = np.asarray(audio, dtype=np.float32)
        n_lat = max(1, -(-audio.shape[1] // codec.SAMPLES_PER_LATENT))
        latents = self.encode_init(audio, n_lat)
        return self.kernels.to_numpy(latents[0])

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """The codec alone: ``[256, T]`` latents -> ``[2, 4096 T]`` float32 audio, the exact chunked decode
        a generation uses (``sa3 decode-latents``)."""
        latents = mx.array(np.asarray(latents, dtype=np.float32)[None])
        audio = self._decode(latents)
        return self.kernels.to_numpy(audio[0])

    def encode_init(self, audio: np.ndarray, n_lat: int) -> mx.array:
        """Encode [2, samples] init audio to ``[1, 256, n_lat]`` latents, trimmed or padded with
        silence to the latent grid."""
        n_samples = n_lat * codec.SAMPLES_PER_LATENT
        audio = np.asarray(audio, dtype=np.float32)[:, :n_samples]
        audio = np.pad(audio, ((0, 0), (0, n_samples - audio.shape[1])))
        latents = codec.encode(self.encoder, mx.array(audio[None]).astype(self.codec_compute_dtype)).astype(mx.float32)
        return latents[..., :n_lat]


__all__ = ["Pipeline", "GenerationResult", "StageStats", "StageStarted", "StageEnded", "Step", "Preview", "Finished",
           "Event", "STAGES", "variation_seed"]
