"""A training run: data -> batches -> steps -> checkpoints, logs and plots; resumable exactly.

Every random choice of step ``k`` (crops, noise, timesteps, CFG dropout, inpaint masks,
silence extension, caption order, trigger) is drawn from a generator seeded with
``(seed, k)``, and the data order of epoch ``e`` from one seeded with ``(seed, e)``. So the
saved state (fp32 LoRA tensors, AdamW moments, step, epoch and position) is all a resume
needs to continue bit-identically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..runtime import compile_by_default, training_step_modes
from . import checkpoint, objective
from .adapters import AdapterConfig, LoraParametrization
from .data import Item, caption_text, encode_folder, silence_latent
from .optimizer import AdamW
from .step import Batch, TrainStep

LOG_FILE = "train_log.jsonl"
BASES_FILE = "svd_bases.safetensors"
CONFIG_FILE = "train_config.json"
PRECISIONS = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


@dataclass
class TrainConfig:
    """Every setting of ``sa3 train`` (the defaults are upstream ``scripts/train_lora.py``'s unless noted)."""

    data: str
    model: str
    out: str | None = None  # run folder; default loras/<data folder name>
    adapter: str = "dora-rows"
    rank: int = 16
    alpha: float | None = None  # default = rank
    include: list[str] | None = None
    exclude: list[str] | None = None
    steps: int = 2000
    lr: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    save_every: int = 500
    crop: int | None = None  # latents; default the model's training length
    timestep_sampler: str = "uniform"
    cfg_dropout: float = 0.1
    mask_loss_weight: float = 1.0
    inpaint_probs: list[float] = field(default_factory=lambda: list(objective.INPAINT_PROBS))
    silence_extension: float = 4.0  # seconds, mean of the exponential draw; 0 = off
    ot_coupling: bool = True
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    clip_norm: float | None = None
    base_precision: str = "fp32"
    checkpointing: bool = False  # gradient checkpointing of the DiT blocks
    fused: bool = False  # compiled blocks with a written-out backward pass (training/fused.py)
    compiled_step: bool | None = None  # the step as one compiled graph; None = the device's default (GPUs: on)
    # the adapted weights formed once per step by each stack (TrainStep(merged_weights=)); None = the device's
    # default (GPUs without --checkpointing: on)
    merged_weights: bool | None = None
    trigger: str | None = None
    trigger_prob: float = 1.0
    tag_keep: float = 1.0  # probability of keeping each tag piece of a tag caption (a random subset per step)
    cache: str | None = None
    plot_every: int = 100  # write the plots every N steps (and at the end); 0 = never
    demo_every: int = 0  # generate the demo prompts with the current LoRA every N steps (and at the end); 0 = never
    demo_prompts: list[str] | None = None
    demo_seconds: float = 10.0
    demo_seed: int = 0

    def __post_init__(self):
        AdapterConfig(self.adapter, self.rank, self.alpha)  # checks type and rank
        if self.timestep_sampler not in objective.TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampler {self.timestep_sampler!r} is not one of "
                             f"{', '.join(objective.TIMESTEP_SAMPLERS)}")
        if self.base_precision not in PRECISIONS:
            raise ValueError(f"base precision {self.base_precision!r} is not one of {', '.join(PRECISIONS)}")
        if len(self.inpaint_probs) != 3 or min(self.inpaint_probs) < 0 or sum(self.inpaint_probs) <= 0:
            raise ValueError("inpaint probabilities: three non-negative numbers (random segments, full, causal)")
        for name in ("steps", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.cfg_dropout <= 1 or not 0 <= self.trigger_prob <= 1 or not 0 <= self.tag_keep <= 1:
            raise ValueError("cfg dropout, trigger and tag probabilities must be in 0..1")
        if self.demo_every and not self.demo_prompts:
            raise ValueError("demo clips every N steps need prompts (--demo-prompts)")
        if self.fused and self.compiled_step:
            raise ValueError("--fused and --compiled-step on are two ways of compiling the step: choose one")

    def adapter_config(self) -> AdapterConfig:
        tup = (lambda v: None if v is None else tuple(v))
        return AdapterConfig(self.adapter, self.rank, self.alpha, tup(self.include), tup(self.exclude))

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    t: list[float]
    seconds: float  # wall time of the step
    epoch: int


class Trainer:
    """Holds the model, the data and the state of one run (see :func:`train`)."""

    def __init__(self, config: TrainConfig, warn: Callable[[str], None] = print,
                 encode_progress: Callable[[int, int, str], None] | None = None, model=None):
        from .. import upstream
        from ..conditioning import PromptEncoder

        self.config = c = config
        self.model = model if model is not None else upstream.load(c.model)
        if not self.model.is_generator:
            raise ValueError(f"{c.model}: not a generator model (no DiT to train)")
        self.run_dir = Path(c.out) if c.out else Path("loras") / Path(c.data).resolve().name
        self.name = self.run_dir.resolve().name
        self.items: list[Item] = encode_folder(c.data, self.model, c.cache, warn=warn, progress=encode_progress)
        self.rate = int(self.model.sample_rate)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        default_crop = int(math.ceil((self.model.training_seconds or 30.0) * self.rate / 4096))
        self.crop = int(c.crop or default_crop)
        dtype = PRECISIONS[c.base_precision]
        dit, conditioner = self.model.load_dit(dtype=dtype)
        self.lora = LoraParametrization.build(self.model.dit_weights, c.adapter_config(), base_dtype=dtype,
                                              bases=self._cached_bases())
        if not self.lora.targets:
            raise ValueError(f"--include {c.include} / --exclude {c.exclude} select no module of the model "
                             "(module names look like model.transformer.layers.0.self_attn.to_qkv; "
                             "a range is written layers.[0-11].)")
        for pattern in (c.include or []):
            if not LoraParametrization.build(self.model.dit_weights, AdapterConfig(c.adapter, c.rank, c.alpha,
                                             (pattern,), None)).targets:
                warn(f"--include {pattern!r} matches no module")
        self.step_fn = TrainStep(dit, conditioner, self.lora, mask_loss_weight=c.mask_loss_weight,
                                 checkpointing=c.checkpointing, fused=c.fused,
                                 **training_step_modes(c.compiled_step, c.merged_weights, c.checkpointing))
        encoder, tokenizer = self.model.load_text(mx.float32)
        self.text = PromptEncoder(encoder, tokenizer, self.model.text.max_length)
        self._prompt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.optimizer = AdamW(lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay,
                               warmup_steps=c.warmup_steps, clip_norm=c.clip_norm, compiled=compile_by_default())
        self.params = self.lora.init_params(seed=c.seed)  # held packed (TrainStep.pack): what the steps update
        self.step, self.epoch, self.position = 0, 0, 0
        self.silence = silence_latent(c.data, self.model, c.cache).astype(np.float32)

    # ---- state
    @property
    def params(self) -> dict[str, mx.array]:
        """The LoRA tensors by their saved names (upstream's)."""
        return self.step_fn.unpack(self.packed)

    @params.setter
    def params(self, params: dict[str, mx.array]) -> None:
        self.packed = self.step_fn.pack(params)

    def optimizer_arrays(self) -> dict[str, mx.array]:
        """AdamW's state by the saved names (``<name>.m``, ``<name>.v``), whatever layout it steps in."""
        state = self.optimizer.state
        if not state:
            return {}
        m = self.step_fn.unpack({n: pair[0] for n, pair in state.items()})
        v = self.step_fn.unpack({n: pair[1] for n, pair in state.items()})
        return {f"{k}.{x}": a[k] for k in m for x, a in (("m", m), ("v", v))}

    def _load_optimizer(self, arrays: dict, step: int) -> None:
        self.optimizer.load_arrays(arrays, step)
        state = self.optimizer.state
        if state:
            m = self.step_fn.pack({n: pair[0] for n, pair in state.items()})
            v = self.step_fn.pack({n: pair[1] for n, pair in state.items()})
            self.optimizer.state = {n: (m[n], v[n]) for n in m}

    def _cached_bases(self) -> dict | None:
        """-xs adapters: the SVD bases of the base weights, computed once per run and kept in the run
        folder (``svd_bases.safetensors``), so a resume (or a slow SVD of a large model) reuses them."""
        if not self.config.adapter.endswith("-xs"):
            return None
        from safetensors.numpy import load_file, save_file

        from .adapters import svd_bases
        from ..lora import key_to_module, target_keys

        path = self.run_dir / BASES_FILE
        rank = self.config.rank
        if path.is_file():
            flat = load_file(str(path))
            out = {k[:-2]: (flat[k], flat[k[:-2] + ".V"]) for k in flat if k.endswith(".U")}
            if all(u.shape[1] == rank for u, _ in out.values()):
                return out
        config = self.config.adapter_config()
        out = {}
        for key in target_keys(self.model.dit_weights):
            module = key_to_module(key)
            if config.targets(module):
                w = np.asarray(self.model.dit_weights[key], np.float32)
                out[module] = svd_bases(w.reshape(w.shape[0], -1), rank)
        flat = {f"{m}.{n}": a for m, (u, v) in out.items() for n, a in (("U", u), ("V", v))}
        checkpoint.atomic_write(path, lambda tmp: save_file(flat, str(tmp)))
        return out

    def resume(self) -> None:
        params, opt, info = checkpoint.load_state(self.run_dir)
        if set(params) != set(self.params):
            raise ValueError(f"{self.run_dir}: the saved LoRA tensors do not match this adapter configuration")
        self.params = params
        self._load_optimizer(opt, info["step"])
        self.step, self.epoch, self.position = int(info["step"]), int(info["epoch"]), int(info["position"])
        log = self.run_dir / LOG_FILE
        if log.is_file():  # drop what was logged after the checkpoint
            keep = [line for line in log.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= self.step]
            checkpoint.atomic_write(log, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep)))

    def demo(self, lora_file: Path, warn: Callable[[str], None] = print) -> list[Path]:
        """The demo prompts generated with ``lora_file`` (the model's default sampler settings, fixed
        seed), written to ``demos/step=N/`` with their settings in the files' metadata."""
        from .. import output
        from ..pipeline import Pipeline

        c = self.config
        folder = self.run_dir / "demos" / f"step={self.step}"
        pipe = Pipeline(str(c.model), loras=[f"{lora_file}:1.0"], progress=False)
        written = []
        for i, prompt in enumerate(c.demo_prompts or []):
            result = pipe.generate(prompt, seconds=c.demo_seconds, seed=c.demo_seed)
            path = folder / f"{i:02d}-{output.slug(prompt)}.wav"
            written += [o.path for o in output.write(result, [path], "wav16", overwrite=True,
                                                     training_step=self.step).outputs]
        return written

    def lora_path(self, step: int | None = None) -> Path:
        return self.run_dir / f"{self.name}-step={self.step if step is None else step}.safetensors"

    def save(self) -> Path:
        path = checkpoint.save_lora(self.lora_path(), self.params, self.lora.config,
                                    extra={"step": self.step, "epoch": self.epoch,
                                           "base_model": str(self.config.model)})
        checkpoint.save_state(self.run_dir, self.params, self.optimizer_arrays(),
                              {"step": self.step, "epoch": self.epoch, "position": self.position,
                               "lora": path.name})
        return path

    # ---- data
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch, 1]).permutation(len(self.items))

    def next_items(self) -> list[Item]:
        out = []
        for _ in range(self.config.batch_size):
            if self.position >= len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
            out.append(self.items[int(self._order(self.epoch)[self.position])])
            self.position += 1
        return out

    def _prompts(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._prompt_cache]
        if missing:
            embeds, mask = self.text.encode(missing)
            for i, t in enumerate(missing):
                self._prompt_cache[t] = (np.array(embeds[i]), np.array(mask[i]))
        return (mx.array(np.stack([self._prompt_cache[t][0] for t in texts])),
                mx.array(np.stack([self._prompt_cache[t][1] for t in texts])))

    def make_batch(self, items: list[Item], step: int) -> tuple[Batch, dict]:
        c = self.config
        rng = np.random.default_rng([c.seed, step, 0])
        crops, valids, seconds = [], [], []
        for item in items:
            lat = item.latents()
            valid = min(item.valid, lat.shape[1])
            if valid > self.crop:
                off = int(rng.integers(0, valid - self.crop + 1))
                crops.append(lat[:, off:off + self.crop])
                valids.append(self.crop)
                seconds.append(min(item.seconds - off * 4096 / self.rate, self.crop * 4096 / self.rate))
            else:
                crops.append(lat[:, :valid])
                valids.append(valid)
                seconds.append(item.seconds)
        T = max(valids)
        x0 = np.zeros((len(items), crops[0].shape[0], T), np.float32)
        for i, lat in enumerate(crops):
            x0[i, :, :lat.shape[1]] = lat
            x0[i, :, lat.shape[1]:] = self.silence[:, None]
        valids = np.array(valids)
        if c.silence_extension > 0:
            draws = rng.exponential(c.silence_extension * self.rate / 4096, len(items))
            valids = objective.silence_extension(valids, draws, T)
        padding = (np.arange(T)[None] < valids[:, None]).astype(np.float32)
        inpaint = np.stack([objective.draw_inpaint_mask(rng, T, int(v), tuple(c.inpaint_probs)) for v in valids])
        kind = c.timestep_sampler
        t_s = objective.sample_timesteps(kind, uniform=rng.random(len(items)),
                                         normal=rng.standard_normal(len(items)))
        lengths = objective.effective_lengths(np.array(seconds), self.rate)
        t = objective.training_shift(t_s, lengths, self.model.training_shift).astype(np.float32)
        keep = (rng.random(len(items)) >= c.cfg_dropout).astype(np.float32)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        if c.ot_coupling and len(items) > 1:
            noise = noise[objective.ot_coupling(x0, noise)]
        texts = [caption_text(item.caption, rng, c.trigger, c.trigger_prob, c.tag_keep) for item in items]
        embeds, mask = self._prompts(texts)
        batch = Batch(x0=mx.array(x0), noise=mx.array(noise), t=mx.array(t), prompt_embeds=embeds, prompt_mask=mask,
                      seconds=mx.array(np.array(seconds, np.float32)), cfg_keep=mx.array(keep),
                      padding_mask=mx.array(padding), inpaint_mask=mx.array(inpaint))
        return batch, {"t": [float(v) for v in t], "prompts": texts}

    # ---- steps
    def train_step(self) -> StepRecord:
        start = time.perf_counter()
        items = self.next_items()
        step = self.step + 1
        batch, info = self.make_batch(items, step)
        loss, grads = self.step_fn.loss_and_grad(self.packed, batch)
        lr = self.optimizer.lr_at(step)
        packed, norm = self.optimizer.update(self.packed, grads)
        mx.eval(packed, loss, norm, [s for pair in self.optimizer.state.values() for s in pair])
        self.packed, self.step = packed, step
        return StepRecord(step, float(loss), lr, float(norm), info["t"], time.perf_counter() - start, self.epoch)


@dataclass
class TrainResult:
    run_dir: Path
    lora: Path | None
    steps: int
    seconds: float
    log: list[dict]
    interrupted: bool = False
    peak_memory: int = 0
    files: int = 0
    trainable: int = 0

    @property
    def it_per_s(self) -> float:
        return len(self.log) / self.seconds if self.seconds > 0 else 0.0


def train(config: TrainConfig | None = None, resume: bool = False, warn: Callable[[str], None] = print,
          on_step: Callable[[StepRecord], None] | None = None, on_start: Callable[[Trainer], None] | None = None,
          encode_progress=None, **settings) -> TrainResult:
    """Train a LoRA (the Python API of ``sa3 train``): ``train(data="my_songs", model="...", steps=200)``.

    ``resume``: continue the run in ``out`` from its last checkpoint (its saved settings are
    used; ``steps`` may be raised). Ctrl-C / SIGTERM save a checkpoint, then re-raise.
    """
    train.last_result = None  # set once the run has a trainer (the CLI reports the checkpoint of an interrupt)
    if config is None:
        config = TrainConfig(**settings)
    if resume:
        out = Path(config.out) if config.out else None
        if out is None or not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{out}: no {CONFIG_FILE} to resume from")
        saved = json.loads((out / CONFIG_FILE).read_text())
        saved.update({"steps": config.steps, "out": str(out)})
        config = TrainConfig.from_json(saved)
    trainer = Trainer(config, warn=warn, encode_progress=encode_progress)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.resume()
    else:
        checkpoint.atomic_write(trainer.run_dir / CONFIG_FILE,
                                lambda tmp: tmp.write_text(json.dumps(asdict(config), indent=1)))
        (trainer.run_dir / LOG_FILE).unlink(missing_ok=True)
    if on_start is not None:
        on_start(trainer)
    log: list[dict] = []
    start = time.perf_counter()
    mx.reset_peak_memory()
    last_saved = None
    interrupted = False
    try:
        with open(trainer.run_dir / LOG_FILE, "a") as f:
            while trainer.step < config.steps:
                record = trainer.train_step()
                entry = asdict(record)
                log.append(entry)
                f.write(json.dumps(entry) + "\n")
                f.flush()
                if on_step is not None:
                    on_step(record)
                if config.save_every and trainer.step % config.save_every == 0:
                    last_saved = trainer.save()
                if config.plot_every and trainer.step % config.plot_every == 0:
                    _plots(trainer.run_dir, warn)
                if config.demo_every and (trainer.step % config.demo_every == 0 or trainer.step == config.steps):
                    if last_saved != trainer.lora_path():
                        last_saved = trainer.save()
                    trainer.demo(last_saved, warn)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if trainer.step > 0 and (last_saved is None or last_saved != trainer.lora_path()):
            last_saved = trainer.save()
        if config.plot_every:
            _plots(trainer.run_dir, warn)
        result = TrainResult(trainer.run_dir, last_saved, trainer.step, time.perf_counter() - start, log,
                             interrupted, mx.get_peak_memory(), len(trainer.items), trainer.lora.trainable_count())
        train.last_result = result
    return result


def _plots(run_dir: Path, warn) -> None:
    try:
        from .plots import write_plots

        write_plots(run_dir)
    except ImportError:
        pass
    except Exception as e:  # a plot must never stop a run
        warn(f"plots not written: {e}")
