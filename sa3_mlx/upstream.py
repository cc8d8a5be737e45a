"""The original PyTorch checkpoints (Hugging Face layout), read without PyTorch.

A model folder (or hub repo) holds ``model_config.json``, ``model.safetensors`` (the
upstream ``state_dict`` of the whole wrapper, or of a standalone SAME autoencoder) and,
for generators, the ``t5gemma-b-b-ul2/`` text encoder in transformers format. Every
component is built from ``model_config.json``: values this port does not implement are
an :class:`UpstreamError` naming the field, never a silent default. Tensors are renamed
to the official MLX names in memory (see ``shared/reference/README.md``, "Key mapping")
and loaded through the same strict loaders as the official files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .audio import SAMPLE_RATE
from .hub import CONVERTED_MANIFEST
from .models.dit import COND_PREFIX
from .settings import MAX_SECONDS
from .weights import WeightDict, WeightError

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
T5_SUBFOLDER = "t5gemma-b-b-ul2"
T5_MODEL_NAME = "google/t5gemma-b-b-ul2"

DIT_PREFIX = "model.model."
CONDITIONER_PREFIX = "conditioner.conditioners."
PRETRANSFORM_PREFIX = "pretransform.model."

OBJECTIVES = ("rf_denoiser", "rectified_flow")


class UpstreamError(WeightError):
    """A checkpoint or config this port cannot run (the message names the field or key)."""


# ---------------------------------------------------------------- config checking


class _Config:
    """A JSON object read with its path, so every error names the exact field."""

    def __init__(self, data: Mapping, path: str, file: str):
        if not isinstance(data, Mapping):
            raise UpstreamError(f"{file}: '{path}' must be an object")
        self.data, self.path, self.file = data, path, file
        self.read: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default=None, required: bool = False):
        self.read.add(key)
        if key not in self.data:
            if required:
                raise UpstreamError(f"{self.file}: missing field '{self._name(key)}'")
            return default
        return self.data[key]

    def child(self, key: str, required: bool = True) -> "_Config | None":
        value = self.get(key, required=required)
        return None if value is None else _Config(value, self._name(key), self.file)

    def expect(self, key: str, allowed: Sequence, default=None, required: bool = False):
        value = self.get(key, default, required)
        if value not in allowed:
            raise UpstreamError(
                f"{self.file}: '{self._name(key)}' is {value!r}; this port supports "
                + ", ".join(repr(a) for a in allowed)
            )
        return value

    def integer(self, key: str, required: bool = True, default: int | None = None) -> int:
        value = self.get(key, default, required)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UpstreamError(f"{self.file}: '{self._name(key)}' must be a non-negative integer, got {value!r}")
        return value

    def defaults(self, allowed: Mapping[str, Sequence]) -> None:
        """Optional fields this port accepts only at the listed (upstream default) values."""
        for key, values in allowed.items():
            if key in self.data:
                self.expect(key, values)

    def done(self, ignored: Sequence[str] = ()) -> None:
        """Every field must have been read or be listed as irrelevant to inference."""
        unknown = sorted(set(self.data) - self.read - set(ignored))
        if unknown:
            raise UpstreamError(
                f"{self.file}: unsupported field(s) {', '.join(repr(self._name(k)) for k in unknown)}"
            )


@dataclass(frozen=True)
class CodecSpec:
    """A SAME encoder/decoder pair as the config describes it."""

    family: str  # "s" (chunked attention) or "l" (sliding window)
    decoder_overrides: dict = field(default_factory=dict)  # SAMEConfig fields shapes cannot show
    encoder_overrides: dict = field(default_factory=dict)
    # SAMEConfig sizes the config states (checked against the weights when loading)
    decoder_sizes: dict = field(default_factory=dict)
    encoder_sizes: dict = field(default_factory=dict)
    chunk_size: int = 32  # generate() aligns lengths to chunk_size / stride latents (either family)
    stride: int = 16
    sample_rate: int = SAMPLE_RATE

    @property
    def name(self) -> str:
        return f"same-{self.family}"


@dataclass(frozen=True)
class TextSpec:
    max_length: int
    padding_mode: str
    subfolder: str
    # Where upstream loads the encoder from when it is not in the model's own folder.
    repo_id: str | None = None
    model_path: str | None = None


@dataclass(frozen=True)
class SamplingSpec:
    """How a generator samples, with the recommended settings for it.

    Upstream ``generate()`` defaults to 8 steps without guidance for every model and
    picks the sampler by objective; the undistilled ``-base`` models need tens of steps
    and CFG, so their recommendation here is 50 Euler steps at CFG 7.
    """

    objective: str  # rf_denoiser (distilled, pingpong) or rectified_flow (base, Euler)
    shift: dict | None  # sampling_distribution_shift_options, None = LogSNR default

    @property
    def distilled(self) -> bool:
        return self.objective == "rf_denoiser"

    @property
    def default_steps(self) -> int:
        return 8 if self.distilled else 50

    @property
    def default_cfg(self) -> float:
        return 1.0 if self.distilled else 7.0

    @property
    def default_sampler(self) -> str:
        return "pingpong" if self.distilled else "euler"


def _check_same(cfg: _Config, role: str) -> tuple[str, dict, dict, int, int]:
    """(family, SAMEConfig overrides, SAMEConfig sizes, chunk_size, stride) of one ``encoder``/``decoder`` entry."""
    cfg.expect("type", ["same"], required=True)
    if role == "decoder":
        soft_clip = cfg.get("soft_clip", False)
        if soft_clip:
            raise UpstreamError(f"{cfg.file}: '{cfg.path}.soft_clip' true is not supported (tanh output clip)")
    inner = cfg.child("config")
    cfg.done()
    io_key = "out_channels" if role == "decoder" else "in_channels"
    width = inner.integer("channels")
    for key in ("c_mults", "transformer_depths", "strides"):
        value = inner.get(key, required=True)
        if not (isinstance(value, list) and len(value) == 1):
            raise UpstreamError(f"{cfg.file}: '{inner.path}.{key}' must have one entry (one resampling block), got {value!r}")
    if inner.get("c_mults") != [1]:
        raise UpstreamError(f"{cfg.file}: '{inner.path}.c_mults' must be [1], got {inner.get('c_mults')!r}")
    stride = inner.get("strides")[0]
    sizes = dict(
        dim=width, head_dim=inner.integer("dim_heads"), num_blocks=inner.get("transformer_depths")[0],
        ff_inner=int(width * inner.get("ff_mult", required=True)), latent_dim=inner.integer("latent_dim"),
        io_channels=inner.integer(io_key),
    )
    for key, value in (("differential", True), ("variable_stride", True), ("dyt", True), ("mapping_bias", True)):
        inner.expect(key, [value], required=True)
    # The decoder's mapping may be a k=3 conv (SAME-S); the kernel is read from the weights.
    inner.expect("conv_mapping", [True, False] if role == "decoder" else [False], required=True)
    overrides: dict = {"stride": stride}
    chunk_size = 32
    if "sliding_window" in inner.data:
        family = "l"
        window = inner.get("sliding_window")
        if not (isinstance(window, list) and len(window) == 2 and all(isinstance(w, int) for w in window)):
            raise UpstreamError(f"{cfg.file}: '{inner.path}.sliding_window' must be [left, right], got {window!r}")
        overrides["sliding_window"] = tuple(window)
        inner.expect("chunk_midpoint_shift", [False], default=False)
        # Not used by the sliding-window attention; generate() still aligns lengths to it.
        chunk_size = inner.integer("chunk_size", required=False, default=32)
    else:
        family = "s"
        chunk_size = inner.integer("chunk_size")
        inner.expect("chunk_midpoint_shift", [True], required=True)
        overrides["chunk_size"] = chunk_size
    if role == "decoder":
        sinusoidal = inner.get("sinusoidal_blocks", [0])
        if not (isinstance(sinusoidal, list) and len(sinusoidal) == 1):
            raise UpstreamError(f"{cfg.file}: '{inner.path}.sinusoidal_blocks' must have one entry, got {sinusoidal!r}")
        overrides["sinusoidal_blocks"] = int(sinusoidal[0])
    inner.done()
    return family, overrides, sizes, chunk_size, stride


def _check_autoencoder(cfg: _Config, sample_rate: int) -> CodecSpec:
    """The SAME autoencoder part: ``model.pretransform.config`` or a standalone ``model``."""
    enc_family, enc_over, enc_sizes, chunk_size, stride = _check_same(cfg.child("encoder"), "encoder")
    dec_family, dec_over, dec_sizes, _, dec_stride = _check_same(cfg.child("decoder"), "decoder")
    if enc_family != dec_family or stride != dec_stride:
        raise UpstreamError(f"{cfg.file}: encoder and decoder of '{cfg.path}' are of different SAME families")
    bottleneck = cfg.child("bottleneck")
    bottleneck.expect("type", ["soft_norm"], required=True)
    b = bottleneck.child("config")
    b.integer("dim")
    b.expect("auto_scale", [True], required=True)
    b.expect("noise_regularize", [False], default=False)
    b.done()
    bottleneck.done()
    patched = cfg.child("pretransform")
    patched.expect("type", ["patched"], required=True)
    p = patched.child("config")
    p.expect("channels", [2], required=True)
    p.expect("patch_size", [256], required=True)
    p.done()
    patched.done()
    cfg.expect("latent_dim", [256], default=256)
    cfg.expect("io_channels", [2], default=2)
    ratio = cfg.integer("downsampling_ratio", required=False, default=256 * stride)
    if ratio != 256 * stride:
        raise UpstreamError(f"{cfg.file}: '{cfg.path}.downsampling_ratio' {ratio} != patch 256 x stride {stride}")
    cfg.done()
    return CodecSpec(enc_family, dec_over, enc_over, dec_sizes, enc_sizes, chunk_size, stride, sample_rate)


def _check_dit(cfg: _Config, file: str) -> dict:
    """``model.diffusion.config`` -> DiTConfig keyword arguments."""
    from .models.dit import DiTConfig

    c = cfg
    embed_dim = c.integer("embed_dim")
    num_heads = c.integer("num_heads")
    if num_heads == 0 or embed_dim % num_heads:
        raise UpstreamError(f"{file}: '{c.path}.embed_dim' {embed_dim} is not a multiple of num_heads {num_heads}")
    c.expect("patch_size", [1], default=1)
    c.expect("global_cond_type", ["adaLN"], required=True)
    c.expect("timestep_cond_type", ["global"], required=True)
    c.expect("timestep_features_type", ["expo"], required=True)
    c.expect("norm_type", ["rms_norm"], required=True)
    attn = c.child("attn_kwargs")
    attn.expect("qk_norm", ["rms"], required=True)
    differential = attn.expect("differential", [False, True], default=False)
    attn.defaults({"qk_norm_eps": [1e-6], "feat_scale": [False], "causal": [False]})
    attn.get("zero_init_output")  # initialisation only
    attn.done()
    ff = c.child("ff_kwargs")
    mult = ff.get("mult", required=True)
    ff.defaults({"no_bias": [False], "glu": [True], "use_conv": [False], "sinusoidal": [False]})
    ff.get("zero_init_output")  # initialisation only
    ff.done()
    local = c.integer("local_add_cond_dim", required=True)
    # Options of DiffusionTransformer / ContinuousTransformer a config may spell out at their
    # defaults (the only values ported); anything else is an error.
    c.defaults({
        "transformer_type": ["continuous_transformer"], "project_cond_tokens": [True], "project_global_cond": [True],
        "input_concat_dim": [0], "prepend_cond_dim": [0], "timestep_features_logsnr": [False],
        "timestep_embed_dim": [None, embed_dim], "rotary_pos_emb": [True], "cross_attn_rotary_pos_emb": [False],
        "conformer": [False], "use_sinusoidal_emb": [False], "use_abs_pos_emb": [False], "sliding_window": [None],
        "final_cross_attn_ix": [-1], "causal": [False], "modular_local_cond_configs": [None, []],
    })
    c.get("zero_init_branch_outputs")  # initialisation only
    kwargs = dict(
        io_channels=c.integer("io_channels"),
        embed_dim=embed_dim,
        depth=c.integer("depth"),
        num_heads=num_heads,
        head_dim=embed_dim // num_heads,
        cond_token_dim=c.integer("cond_token_dim"),
        global_cond_dim=c.integer("global_cond_dim"),
        local_add_cond_dim=local,
        num_memory_tokens=c.integer("num_memory_tokens"),
        ff_inner=int(embed_dim * mult),
        timestep_features_dim=c.integer("timestep_features_dim"),
        differential=bool(differential),
    )
    c.done()
    try:
        DiTConfig(**kwargs)
    except ValueError as e:
        raise UpstreamError(f"{file}: '{c.path}' is inconsistent ({e})") from None
    return kwargs


def _check_shift(options, file: str) -> dict | None:
    """``sampling_distribution_shift_options``: None (absent or null) = upstream's LogSNR default."""
    from .sampling import SHIFT_DEFAULTS

    if options is None:
        return None
    cfg = _Config(options, "model.diffusion.sampling_distribution_shift_options", file)
    kind = cfg.expect("type", list(SHIFT_DEFAULTS), default="full")
    for key in SHIFT_DEFAULTS[kind]:
        cfg.get(key)
    cfg.done()
    return {"type": kind, **{k: v for k, v in options.items() if k != "type"}}


# ---------------------------------------------------------------- safetensors reading


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (bf16 widened to fp32)."""
    from safetensors import safe_open

    if not path.is_file():
        raise UpstreamError(f"weight file not found: {path}")
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except TypeError:  # numpy has no bfloat16: read those through MLX
        out = {k: np.array(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.array(v)
               for k, v in mx.load(str(path)).items()}
    except Exception as e:  # a damaged header or truncated file
        raise UpstreamError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_sharded(folder: Path, name: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
    """``name`` or, when the weights are sharded, every file its ``.index.json`` lists."""
    index = folder / f"{name}.index.json"
    if not (folder / name).is_file() and index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(read_safetensors(folder / shard))
        return tensors
    return read_safetensors(folder / name)


# ---------------------------------------------------------------- key mapping


def fuse_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """PyTorch ``weight_norm`` (dim 0): ``g * v / ||v||`` with the norm of each output row."""
    v64 = v.astype(np.float64)
    norm = np.sqrt((v64 * v64).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


class _Taker:
    """Pops tensors by name so that whatever is left over can be reported as unknown."""

    def __init__(self, tensors: Mapping[str, np.ndarray], file: str):
        self.left = dict(tensors)
        self.file = file

    def take(self, key: str) -> np.ndarray:
        if key not in self.left:
            raise UpstreamError(f"{self.file}: missing key '{key}'")
        return self.left.pop(key)

    def take_prefix(self, prefix: str) -> dict[str, np.ndarray]:
        found = {k[len(prefix):]: self.left.pop(k) for k in [k for k in self.left if k.startswith(prefix)]}
        return found

    def drop(self, predicate) -> None:
        for k in [k for k in self.left if predicate(k)]:
            del self.left[k]

    def finish(self, what: str) -> None:
        if self.left:
            keys = sorted(self.left)
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            raise UpstreamError(f"{self.file}: unexpected key(s) for {what}: {', '.join(keys[:5])}{more}")


def map_dit(tensors: Mapping[str, np.ndarray], file: str, prompt_id: str = "prompt",
            seconds_id: str = "seconds_total", padding_mode: str = "learned") -> dict[str, np.ndarray]:
    """Upstream DiT + conditioner tensors -> official MLX DiT file names (incl. ``cond.*``).

    ``padding_mode`` "zero" (no learned embedding upstream) becomes an all-zero
    ``cond.padding_embedding``: replacing pad positions by zeros is the same operation.
    """
    taker = _Taker({k: v for k, v in tensors.items() if k.startswith((DIT_PREFIX, CONDITIONER_PREFIX))}, file)
    out: dict[str, np.ndarray] = {}
    for key, value in taker.take_prefix(DIT_PREFIX).items():
        if key == "transformer.rotary_pos_emb.inv_freq":
            continue  # recomputed by mx.fast.rope
        name = key
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        parts = name.split(".")
        if len(parts) > 4 and parts[0] == "transformer" and parts[3] == "to_local_embed":
            name = ".".join(parts[:4] + ["seq"] + parts[4:])
        if name in ("preprocess_conv.weight", "postprocess_conv.weight"):
            value = np.ascontiguousarray(value.transpose(0, 2, 1))  # [out, in, 1] -> [out, 1, in]
        out[name] = value
    prompt = CONDITIONER_PREFIX + prompt_id + "."
    seconds = CONDITIONER_PREFIX + seconds_id + ".embedder.embedding.1."
    out[COND_PREFIX + "seconds_total_weight"] = taker.take(seconds + "weight")
    if padding_mode == "learned":
        out[COND_PREFIX + "padding_embedding"] = taker.take(prompt + "padding_embedding")
    else:
        out[COND_PREFIX + "padding_embedding"] = np.zeros(out[COND_PREFIX + "seconds_total_weight"].shape[0], np.float32)
    out[COND_PREFIX + "seconds_total_bias"] = taker.take(seconds + "bias")
    taker.finish("the DiT and its conditioners")
    return out


def map_same(tensors: Mapping[str, np.ndarray], file: str, prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
    """Upstream SAME autoencoder tensors (under ``prefix``) -> ``{"encoder": ..., "decoder": ...}``
    in official MLX names, with the weight-normed mappings fused."""
    taker = _Taker({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, file)

    def block(src: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        out["new_tokens"] = taker.take(src + "new_tokens")
        out["mapping.weight"] = fuse_weight_norm(taker.take(src + "mapping.weight_g"), taker.take(src + "mapping.weight_v"))
        out["mapping.bias"] = taker.take(src + "mapping.bias")
        for key, value in taker.take_prefix(src + "transformers.").items():
            index, rest = key.split(".", 1)
            if rest == "rope.inv_freq":
                continue
            for old, new in (("self_attn.", "attn."), ("ff.ff.0.proj.", "ff.glu_proj."), ("ff.ff.2.", "ff.proj_out.")):
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{index}.{rest}"] = value
        if not any(k.startswith("blocks.") for k in out):
            raise UpstreamError(f"{file}: no '{prefix}{src}transformers.N.*' tensors found")
        return out

    decoder = {"project_in.weight": taker.take("decoder.layers.1.weight"), "project_in.bias": taker.take("decoder.layers.1.bias")}
    decoder.update(block("decoder.layers.3."))
    encoder = block("encoder.layers.0.")
    encoder["project_out.weight"] = taker.take("encoder.layers.2.weight")
    encoder["project_out.bias"] = taker.take("encoder.layers.2.bias")
    running_std = taker.take("bottleneck.running_std")
    decoder["running_std"] = encoder["running_std"] = running_std
    encoder["scaling_factor"] = taker.take("bottleneck.scaling_factor")
    encoder["bias"] = taker.take("bottleneck.bias")
    taker.drop(lambda k: k == "bottleneck.noise_scaling_factor")  # empty unless noise_regularize
    taker.finish("the SAME autoencoder")
    return {"encoder": encoder, "decoder": decoder}


# ---------------------------------------------------------------- the text encoder folder


def t5_config(folder: Path, max_length: int):
    """T5GemmaConfig from a transformers ``config.json`` (the encoder part)."""
    from .models.t5gemma import T5GemmaConfig

    file = str(folder / "config.json")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UpstreamError(f"{file}: cannot read the T5Gemma config ({e})") from None
    if raw.get("model_type") not in ("t5gemma", "t5_gemma_module"):
        raise UpstreamError(f"{file}: model_type {raw.get('model_type')!r} is not a T5Gemma model")
    enc = raw.get("encoder", raw)
    path = "encoder" if "encoder" in raw else ""

    def field_(key, default=None):
        if key not in enc and default is None:
            raise UpstreamError(f"{file}: missing field '{path + '.' if path else ''}{key}'")
        return enc.get(key, default)

    if field_("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UpstreamError(f"{file}: hidden_activation {enc['hidden_activation']!r} is not supported")
    if enc.get("attention_bias", False):
        raise UpstreamError(f"{file}: attention_bias true is not supported")
    rope = enc.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or enc.get("rope_scaling"):
        raise UpstreamError(f"{file}: only the default RoPE is supported (got {rope or enc.get('rope_scaling')!r})")
    theta = rope.get("rope_theta", enc.get("rope_theta", 10000.0))
    for layer_type in enc.get("layer_types") or []:
        if layer_type not in ("sliding_attention", "full_attention"):
            raise UpstreamError(f"{file}: layer type {layer_type!r} is not supported")
    window = enc.get("sliding_window")
    if "sliding_attention" in (enc.get("layer_types") or []) and window is not None and window < max_length:
        raise UpstreamError(f"{file}: sliding_window {window} < the prompt length {max_length}: not supported")
    try:
        return T5GemmaConfig(
            hidden_size=field_("hidden_size"),
            num_hidden_layers=field_("num_hidden_layers"),
            num_attention_heads=field_("num_attention_heads"),
            num_key_value_heads=field_("num_key_value_heads"),
            head_dim=field_("head_dim"),
            intermediate_size=field_("intermediate_size"),
            vocab_size=field_("vocab_size"),
            rope_theta=float(theta),
            rms_norm_eps=float(enc.get("rms_norm_eps", 1e-6)),
            attn_logit_softcapping=enc.get("attn_logit_softcapping", 50.0),
            query_pre_attn_scalar=enc.get("query_pre_attn_scalar"),
            pad_token_id=int(enc.get("pad_token_id", raw.get("pad_token_id", 0))),
        )
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{file}: inconsistent T5Gemma config ({e})") from None


def map_t5(tensors: Mapping[str, np.ndarray], file: str) -> dict[str, np.ndarray]:
    """transformers ``encoder.*`` (or ``model.encoder.*``) -> official MLX T5Gemma names."""
    out = {}
    unknown = []
    for key, value in tensors.items():
        for prefix in ("encoder.", "model.encoder."):
            if key.startswith(prefix):
                out[key[len(prefix):]] = value
                break
        else:
            # The decoder half and the LM head of a full encoder-decoder checkpoint are not used.
            if not key.startswith(("decoder.", "model.decoder.", "lm_head.")):
                unknown.append(key)
    if unknown:
        raise UpstreamError(f"{file}: unexpected T5Gemma key(s): {', '.join(sorted(unknown)[:5])}")
    if not out:
        raise UpstreamError(f"{file}: no 'encoder.*' tensors found")
    return out


class HFTokenizer:
    """The folder's tokenizer, as transformers' ``AutoTokenizer`` uses it for the conditioner.

    ``tokenizer.json`` is read with the ``tokenizers`` library (``tokenizer.model``,
    SentencePiece, when there is none). BOS/EOS follow ``tokenizer_config.json``
    (``add_bos_token``/``add_eos_token``), else the ``tokenizer.json`` post-processor
    (GemmaTokenizer's default: BOS only). Padding side and pad token come from
    ``tokenizer_config.json`` (GemmaTokenizer's class default is left). Prompts are
    truncated to ``max_length`` keeping the special tokens.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
        self._tokenizer = self._sp = None
        if json_path.is_file():
            from tokenizers import Tokenizer as FastTokenizer

            self._tokenizer = FastTokenizer.from_file(str(json_path))
            token_id = self._tokenizer.token_to_id
            post = json.loads(json_path.read_text()).get("post_processor") or {}
            template = json.dumps(post.get("single", ""))
        elif model_path.is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            self._sp.Load(str(model_path))
            token_id = self._sp.piece_to_id
            template = None
        else:
            raise UpstreamError(f"{folder}: no tokenizer.json or tokenizer.model")

        def special(name: str, default: str) -> int | None:
            token = self.config.get(name, default)
            if isinstance(token, dict):
                token = token.get("content")
            if token is None:
                return None
            found = token_id(token)
            return None if found is None or (self._sp is not None and found == self._sp.unk_id() and token != "<unk>") else found

        self.bos_id = special("bos_token", "<bos>")
        self.eos_id = special("eos_token", "<eos>")
        self.pad_id = special("pad_token", "<pad>")
        if self.pad_id is None:
            raise UpstreamError(f"{folder}: the tokenizer has no pad token")
        bos_token = self.config.get("bos_token", "<bos>")
        default_bos = True if template is None else json.dumps(bos_token if isinstance(bos_token, str) else "") in template
        self.add_bos = bool(self.config.get("add_bos_token", default_bos))
        self.add_eos = bool(self.config.get("add_eos_token", False))
        if (self.add_bos and self.bos_id is None) or (self.add_eos and self.eos_id is None):
            raise UpstreamError(f"{folder}: tokenizer_config asks for BOS/EOS tokens the vocabulary lacks")
        self.padding_side = self.config.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise UpstreamError(f"{config_path}: padding_side {self.padding_side!r} must be 'left' or 'right'")

    def _pieces(self, prompt: str) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.encode(prompt, add_special_tokens=False).ids
        return self._sp.Encode(prompt)

    def count(self, text: str) -> int:
        """The number of content tokens (no special tokens) of ``text``: prompt weighting's token offsets."""
        return len(self._pieces(text))

    def special_tokens(self) -> tuple[int, int]:
        """The special tokens :meth:`encode` puts before and after a prompt's own tokens."""
        return int(self.add_bos), int(self.add_eos)

    def encode(self, prompts: list[str], max_length: int) -> tuple[mx.array, mx.array]:
        """Ids and mask (1 = real token), int32 ``[len(prompts), max_length]``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of str, got {prompts!r}")
        ids = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), max_length), dtype=np.int32)
        for row, prompt in enumerate(prompts):
            head = [self.bos_id] if self.add_bos else []
            tail = [self.eos_id] if self.add_eos else []
            body = self._pieces(prompt)[: max(0, max_length - len(head) - len(tail))]
            tokens = (head + body + tail)[:max_length]
            start = 0 if self.padding_side == "right" else max_length - len(tokens)
            ids[row, start:start + len(tokens)] = tokens
            mask[row, start:start + len(tokens)] = 1
        return mx.array(ids), mx.array(mask)

    def sentencepiece_model(self) -> bytes | None:
        path = self.folder / "tokenizer.model"
        return path.read_bytes() if path.is_file() else None


# ---------------------------------------------------------------- the model


def find_text_folder(root: Path, text: TextSpec) -> Path:
    folder = root / text.subfolder
    if folder.is_dir():
        return folder
    if text.model_path:
        for candidate in (Path(text.model_path).expanduser() / text.subfolder, Path(text.model_path).expanduser()):
            if (candidate / "config.json").is_file():
                return candidate
    if text.repo_id:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text.repo_id, allow_patterns=[f"{text.subfolder}/*"])) / text.subfolder
        except Exception as e:  # offline, gated, missing: one clear message
            raise UpstreamError(
                f"{folder} is missing and the T5Gemma encoder could not be fetched from {text.repo_id} ({e})"
            ) from None
    raise UpstreamError(f"{folder}: the T5Gemma folder is missing")


def check_dit_config(found, expected, file) -> None:
    """The DiT read from the weights must be the one ``model.diffusion.config`` describes."""
    found, expected = asdict(found), asdict(expected)
    wrong = [f"{k} {expected[k]} (weights: {found[k]})" for k in expected if found[k] != expected[k]]
    if wrong:
        raise UpstreamError(f"{file}: model.diffusion.config does not match the weights: {', '.join(wrong)}")


def check_codec_sizes(config, codec: CodecSpec, role: str, file) -> None:
    """The SAME sizes read from the weights must be those ``model_config.json`` states."""
    expected = codec.decoder_sizes if role == "decoder" else codec.encoder_sizes
    found = {k: getattr(config, k) for k in expected}
    if found != expected:
        wrong = ", ".join(f"{k} {expected[k]} (weights: {found[k]})" for k in expected if found[k] != expected[k])
        raise UpstreamError(f"{file}: the SAME {role} config does not match the weights: {wrong}")


@dataclass
class UpstreamModel:
    """A parsed upstream checkpoint: configs and tensors renamed to the official MLX names."""

    root: Path
    model_type: str
    sample_rate: int
    codec: CodecSpec
    same_weights: dict[str, dict[str, np.ndarray]]  # "encoder"/"decoder" -> MLX names
    dit_config: dict | None = None  # DiTConfig kwargs
    dit_weights: dict[str, np.ndarray] | None = None  # MLX names incl. cond.*
    text: TextSpec | None = None
    sampling: SamplingSpec | None = None
    seconds_range: tuple[float, float] = (0.0, MAX_SECONDS)
    training_seconds: float | None = None  # model_config's sample_size: clips beyond it are off-distribution
    # model.diffusion.distribution_shift_options: the timestep shift of training (sa3 train), None = none
    training_shift: dict | None = None

    @property
    def is_generator(self) -> bool:
        return self.dit_weights is not None

    # ---- loaders (strict, through the same code as the official files)
    def load_dit(self, dtype: mx.Dtype = mx.float32, weights: Mapping | None = None, quantize=None):
        """``(dit, conditioner)``; ``weights`` replaces the DiT tensors (e.g. LoRA-merged); ``quantize``
        see :func:`sa3_mlx.models.dit.load_dit`."""
        from .conditioning import load_conditioner
        from .models.dit import DiTConfig, load_dit
        from .weights import Overlay

        name = f"{self.root.name}/{WEIGHTS_FILE}"
        dit, config, cond = load_dit(Overlay(weights if weights is not None else self.dit_weights, {}, name),
                                     dtype=dtype, quantize=quantize)
        check_dit_config(config, DiTConfig(**self.dit_config), self.root / CONFIG_FILE)
        return dit, load_conditioner(cond, name, seconds_range=self.seconds_range)

    def load_codec(self, role: str, dtype: mx.Dtype = mx.float32):
        from .models.same import load_same

        overrides = self.codec.decoder_overrides if role == "decoder" else self.codec.encoder_overrides
        weights = WeightDict(self.same_weights[role], f"{self.root.name}/{WEIGHTS_FILE} ({role})")
        model = load_same(weights, role, family=self.codec.family, dtype=dtype, **overrides)
        check_codec_sizes(model.config, self.codec, role, self.root / CONFIG_FILE)
        return model

    def text_folder(self) -> Path:
        """The T5Gemma folder: ``<root>/<subfolder>``, else the config's ``model_path`` or ``repo_id``."""
        return find_text_folder(self.root, self.text)

    def t5_weights(self) -> tuple[object, dict[str, np.ndarray]]:
        """``(T5GemmaConfig, MLX-named tensors)`` of the text encoder folder."""
        folder = self.text_folder()
        return t5_config(folder, self.text.max_length), map_t5(read_sharded(folder), str(folder / WEIGHTS_FILE))

    def load_text(self, dtype: mx.Dtype = mx.float32):
        """``(T5GemmaEncoder, HFTokenizer)``."""
        from .models.t5gemma import T5GemmaEncoder, sanitize
        from .weights import load_strict

        config, weights = self.t5_weights()
        encoder = T5GemmaEncoder(config)
        name = f"{self.text.subfolder}/{WEIGHTS_FILE}"
        load_strict(encoder, sanitize(WeightDict(weights, name)), name, dtype=dtype, keep_dtype=("embed_tokens.weight",))
        encoder.eval()
        return encoder, HFTokenizer(self.text_folder())


def _check_conditioning(cfg: _Config, file: str) -> tuple[TextSpec, tuple[float, float], int, str, str]:
    cond_dim = cfg.integer("cond_dim")
    configs = cfg.get("configs", required=True)
    if not isinstance(configs, list):
        raise UpstreamError(f"{file}: 'model.conditioning.configs' must be a list")
    text = seconds_range = None
    prompt_id = seconds_id = None
    for i, entry in enumerate(configs):
        e = _Config(entry, f"model.conditioning.configs[{i}]", file)
        kind = e.expect("type", ["t5gemma", "number"], required=True)
        cid = e.get("id", required=True)
        c = e.child("config")
        e.done()
        if kind == "t5gemma":
            c.expect("model_name", [T5_MODEL_NAME], required=True)
            repo_id, model_path = c.get("repo_id"), c.get("model_path")
            subfolder = c.get("subfolder") or T5_SUBFOLDER
            max_length = c.integer("max_length", required=False, default=128)
            # Upstream's class default is "zero"; "none" (raw pad-token embeddings) is not ported.
            padding = c.expect("padding_mode", ["learned", "zero"], default="zero")
            c.expect("project_out", [False, None], default=None)
            c.get("enable_grad")  # training only
            c.done()
            text, prompt_id = TextSpec(max_length, padding, subfolder, repo_id, model_path), cid
        else:
            lo, hi = c.get("min_val", 0), c.get("max_val", 1)
            c.expect("fourier_features_type", ["expo"], required=True)
            c.done()
            if not hi > lo:
                raise UpstreamError(f"{file}: '{c.path}' needs max_val > min_val")
            seconds_range, seconds_id = (float(lo), float(hi)), cid
    cfg.done()
    if text is None or seconds_range is None:
        raise UpstreamError(f"{file}: 'model.conditioning.configs' needs a t5gemma and a number conditioner")
    return text, seconds_range, cond_dim, prompt_id, seconds_id


def parse(root: Path) -> UpstreamModel:
    """Validate ``root/model_config.json`` and map ``root/model.safetensors`` (nothing is loaded into MLX)."""
    file = str(root / CONFIG_FILE)
    try:
        raw = json.loads((root / CONFIG_FILE).read_text())
    except OSError as e:
        raise UpstreamError(f"{file}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise UpstreamError(f"{file}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise UpstreamError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise UpstreamError(f"{file}: nested too deeply to be a model config") from None
    if not isinstance(raw, dict):
        raise UpstreamError(f"{file}: must hold a JSON object, not {type(raw).__name__}")
    top = _Config(raw, "", file)
    model_type = top.expect("model_type", ["diffusion_cond", "diffusion_cond_inpaint", "autoencoder"], required=True)
    sample_rate = top.expect("sample_rate", [SAMPLE_RATE], required=True)
    top.expect("audio_channels", [2], default=2)
    sample_size = top.get("sample_size")  # the training length in samples
    model = top.child("model")
    # Training-time sections, and svd_bases_path: a pickled .pt of precomputed -xs LoRA bases, which
    # are recomputed from the weights instead (upstream's fallback when the file is absent).
    top.done(ignored=("training", "dataset_config", "model_name", "svd_bases_path"))
    tensors = read_sharded(root)
    weights_file = str(root / WEIGHTS_FILE)

    if model_type == "autoencoder":
        codec = _check_autoencoder(model, sample_rate)
        prefix = PRETRANSFORM_PREFIX if any(k.startswith(PRETRANSFORM_PREFIX) for k in tensors) else ""
        return UpstreamModel(root, model_type, sample_rate, codec, map_same(tensors, weights_file, prefix))

    io_channels = model.integer("io_channels")
    pretransform = model.child("pretransform")
    pretransform.expect("type", ["autoencoder"], required=True)
    # Memory options of upstream's decode; decoding here is exact whatever the chunking (codec.py).
    pretransform.get("chunked")
    pretransform.get("iterate_batch")
    codec = _check_autoencoder(pretransform.child("config"), sample_rate)
    pretransform.done()

    text, seconds_range, cond_dim, prompt_id, seconds_id = _check_conditioning(model.child("conditioning"), file)

    diffusion = model.child("diffusion")
    diffusion.expect("type", ["dit"], required=True)
    diffusion.defaults({"input_concat_ids": [[]], "prepend_cond_ids": [[]], "modular_local_cond_configs": [None, []]})
    objective = diffusion.expect("diffusion_objective", OBJECTIVES, required=True)
    cross_ids = diffusion.get("cross_attention_cond_ids", required=True)
    if cross_ids != [prompt_id, seconds_id]:
        raise UpstreamError(f"{file}: 'model.diffusion.cross_attention_cond_ids' must be {[prompt_id, seconds_id]}, got {cross_ids!r}")
    global_ids = diffusion.get("global_cond_ids", required=True)
    if global_ids != [seconds_id]:
        raise UpstreamError(f"{file}: 'model.diffusion.global_cond_ids' must be {[seconds_id]}, got {global_ids!r}")
    local_ids = diffusion.get("local_add_cond_ids", required=True)
    if local_ids != ["inpaint_mask", "inpaint_masked_input"]:
        raise UpstreamError(f"{file}: 'model.diffusion.local_add_cond_ids' must be ['inpaint_mask', 'inpaint_masked_input'], got {local_ids!r}")
    shift = _check_shift(diffusion.get("sampling_distribution_shift_options"), file)
    # Training-only (kept for sa3 train) or always-on in generate(): read, nothing to configure.
    training_shift = diffusion.get("distribution_shift_options")
    training_shift = dict(training_shift) if isinstance(training_shift, dict) else None
    for key in ("mask_padding_attention", "use_effective_length_for_schedule"):
        diffusion.get(key)
    dit_kwargs = _check_dit(diffusion.child("config"), file)
    diffusion.done()
    model.done()
    if dit_kwargs["io_channels"] != io_channels or dit_kwargs["local_add_cond_dim"] != io_channels + 1:
        raise UpstreamError(f"{file}: model.io_channels {io_channels} does not fit the DiT config")
    if dit_kwargs["cond_token_dim"] != cond_dim or dit_kwargs["global_cond_dim"] != cond_dim:
        raise UpstreamError(f"{file}: model.conditioning.cond_dim {cond_dim} != the DiT's conditioning widths")

    same_weights = map_same(tensors, weights_file, PRETRANSFORM_PREFIX)
    dit_weights = map_dit(tensors, weights_file, prompt_id, seconds_id, text.padding_mode)
    leftover = [k for k in tensors if not k.startswith((DIT_PREFIX, CONDITIONER_PREFIX, PRETRANSFORM_PREFIX))]
    if leftover:
        raise UpstreamError(f"{weights_file}: unexpected key(s): {', '.join(sorted(leftover)[:5])}")
    training_seconds = sample_size / sample_rate if isinstance(sample_size, (int, float)) and sample_size > 0 else None
    return UpstreamModel(
        root, model_type, sample_rate, codec, same_weights, dit_kwargs, dit_weights, text,
        SamplingSpec(objective, shift), seconds_range, training_seconds, training_shift,
    )


# ---------------------------------------------------------------- where the files are


def is_upstream_source(source: str | Path) -> bool:
    """A local folder with ``model_config.json``, or something shaped like a hub repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() or (path / CONVERTED_MANIFEST).is_file()
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def resolve(source: str | Path, progress: bool = True) -> Path:
    """A local folder for ``source``: the folder itself, or a hub snapshot of the files a run needs."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() and not (path / CONVERTED_MANIFEST).is_file():
            raise UpstreamError(f"{path}: no {CONFIG_FILE} (not an upstream Stable Audio 3 model folder)")
        return path
    if not is_upstream_source(source):
        raise UpstreamError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from .hub import hub_reachable, quiet_hub_logs

    try:
        (enable_progress_bars if progress else disable_progress_bars)()
        quiet_hub_logs()
        folder = snapshot_download(
            str(source),
            allow_patterns=[CONFIG_FILE, "model.safetensors*", f"{T5_SUBFOLDER}/*"],
            # No DNS at all: use the cache at once instead of ~25 s of retries.
            local_files_only=not hub_reachable(),
        )
    except RepositoryNotFoundError:
        raise UpstreamError(
            f"{source}: repository not found or not accessible (gated: accept the licence at "
            f"https://huggingface.co/{source} and log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise UpstreamError(f"{source}: not in the local Hugging Face cache and cannot be downloaded (offline?)") from None
    except HfHubHTTPError as e:
        raise UpstreamError(f"{source}: download failed ({e})") from None
    return Path(folder)


def load(source: str | Path, progress: bool = True) -> UpstreamModel:
    """Parse an original release from a local folder or a hub repo id (``sa3 convert`` folders are
    read by :mod:`sa3_mlx.sources.converted`)."""
    return parse(resolve(source, progress))
