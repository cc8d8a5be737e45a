"""Models built in memory rather than read from files: full-size random weights, or given modules.

:func:`random_source` builds the released architectures with random values (speed does
not depend on the values), so ``sa3 bench --random-weights`` needs no download; tests
hand :class:`ModuleSource` the modules they built. Nothing sets a pipeline's private state.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path

from .. import hub
from . import DISTILLED_DEFAULTS, PROMPT_TOKENS, CodecLayout, ModelDefaults

# The released models' sizes, as their weight files give them (checked against the
# official manifests in tests/test_manifests.py). Used only to build random weights.
RELEASED_T5GEMMA = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                        head_dim=64, intermediate_size=2048, vocab_size=256000, attn_logit_softcapping=50.0,
                        query_pre_attn_scalar=64)
_DIT_COMMON = dict(io_channels=256, head_dim=64, cond_token_dim=768, global_cond_dim=768, local_add_cond_dim=257,
                   num_memory_tokens=64, timestep_features_dim=256)
RELEASED_DIT = {
    "sm-music": dict(embed_dim=1024, depth=20, num_heads=16, ff_inner=4096, differential=False, **_DIT_COMMON),
    "medium": dict(embed_dim=1536, depth=24, num_heads=24, ff_inner=6144, differential=True, **_DIT_COMMON),
}
RELEASED_DIT["sm-sfx"] = RELEASED_DIT["sm-music"]
RELEASED_SAME = {
    "same-s": dict(family="s", dim=768, num_heads=12, head_dim=64, num_blocks=6, ff_inner=2304),
    "same-l": dict(family="l", dim=1536, num_heads=24, head_dim=64, num_blocks=12, ff_inner=4608,
                   sinusoidal_blocks=8),
}
# A prompt whose token count with the small tokenizer below matches Gemma's for it (16 with <bos>).
BENCH_PROMPT = "warm analog synth arpeggio over a deep house groove, 124 BPM"


class ModuleSource:
    """A source whose parts come from callables: ``text()`` -> (encoder, tokenizer),
    ``dit()`` -> (DiT, Conditioner), ``codec(codec, role)`` -> SAME module; each call may
    build anew (random weights) or return the same module (tests). ``dtype`` arguments are
    applied by casting what the callables return."""

    is_release = False
    shift = None
    training_seconds = None

    def __init__(self, name: str, text: Callable, dit: Callable, codec: Callable, codec_name: str = "same-s",
                 defaults: ModelDefaults = DISTILLED_DEFAULTS, prompt_tokens: int = PROMPT_TOKENS,
                 codecs: tuple[str, ...] | None = None):
        self.name = name
        self.codec = codec_name
        self.codecs = codecs or (codec_name,)
        self.defaults = defaults
        self.prompt_tokens = prompt_tokens
        self._text, self._dit, self._codec = text, dit, codec

    def codec_layout(self, codec: str) -> CodecLayout:
        return CodecLayout(family=hub.codec_family(codec))

    def fetch(self, codec: str, encoder: bool = False) -> list[Path]:
        return []

    def load_text(self, dtype):
        encoder, tokenizer = self._text()
        # The embedding table keeps its own dtype, as load_t5gemma keeps the file's (fp16: 0.39 GB, not 0.79).
        return _cast(encoder, dtype, keep="embed_tokens"), tokenizer

    def dit_weights(self) -> Mapping:
        from mlx.utils import tree_flatten

        from ..models.dit import COND_PREFIX

        dit, conditioner = self._dit()
        weights = dict(tree_flatten(dit.parameters()))
        weights.update({COND_PREFIX + k: v for k, v in tree_flatten(conditioner.parameters())})
        return weights

    def load_dit(self, dtype, weights: Mapping | None = None, quantize=None):
        if weights is not None:
            from ..conditioning import load_conditioner
            from ..models.dit import load_dit
            from ..weights import Overlay

            dit, _, cond = load_dit(Overlay(weights, {}, self.name), dtype=dtype, quantize=quantize)
            return dit, load_conditioner(cond, self.name)
        dit, conditioner = self._dit()
        if quantize is not None:  # layer by layer, before the rest is evaluated: never the whole float DiT
            from ..quantize import dit_targets, quantize_module

            quantize_module(dit, quantize, dit_targets(dit, quantize), dtype)
        return _cast(dit, dtype), conditioner

    def load_codec(self, codec: str, role: str, dtype):
        if codec not in self.codecs:
            raise ValueError(f"{self.name} has no {codec} codec (it has {', '.join(self.codecs)})")
        return _cast(self._codec(codec, role), dtype)


def _cast(module, dtype, keep: str | None = None):
    """Cast ``module``'s floating parameters to ``dtype``, except those under the submodule ``keep``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    kept = [] if keep is None else [(k, v) for k, v in tree_flatten(module.parameters()) if k.startswith(keep + ".")]
    if dtype is not None and any(v.dtype != dtype for k, v in _floating(module) if k not in dict(kept)):
        module.set_dtype(dtype)
        if kept:
            module.update(tree_unflatten(kept))  # as they were built
    mx.eval(module.parameters())
    return module


def _floating(module):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def random_source(model: str = "sm-music") -> ModuleSource:
    """``model``'s released architecture (text encoder, DiT, both codec halves) with random weights."""
    if model not in RELEASED_DIT:
        raise ValueError(f"no released architecture for {model!r} (choose from {', '.join(RELEASED_DIT)})")

    # Each part from its own seed: every build of a part has the same values (the fidelity benchmark
    # compares pipelines built apart).
    def text():
        import mlx.core as mx

        from ..models.t5gemma import T5GemmaConfig, T5GemmaEncoder, Tokenizer

        mx.random.seed(0)
        encoder = T5GemmaEncoder(T5GemmaConfig(**RELEASED_T5GEMMA))
        # fp16, as the official file holds it; a random block repeated down the vocabulary, so that building it
        # never holds a transient fp32 table (0.79 GB) that loading the real file does not have either
        rows, width = encoder.embed_tokens.weight.shape
        block = mx.random.normal((2000, width)).astype(mx.float16)
        encoder.embed_tokens.weight = mx.tile(block, (-(-rows // 2000), 1))[:rows]
        return encoder, Tokenizer(bench_tokenizer(), pad_id=0)

    def dit():
        import mlx.core as mx

        from ..conditioning import Conditioner, ConditionerConfig
        from ..models.dit import DiT, DiTConfig

        mx.random.seed(1)
        config = DiTConfig(**RELEASED_DIT[model])
        dit = DiT(config)
        conditioner = Conditioner(ConditionerConfig(cond_dim=config.cond_token_dim, seconds_features=256))
        # the seconds embedding at a Linear's initial scale: its zeros would give a DoRA adapter on it a zero
        # row norm (NaN gradients in `sa3 bench --train`, as upstream's DoRA would give)
        w = conditioner.seconds_total_weight
        conditioner.seconds_total_weight = mx.random.uniform(-1, 1, w.shape) * w.shape[1] ** -0.5
        return dit, conditioner

    def codec(name: str, role: str):
        import mlx.core as mx

        from ..models.same import SAMEConfig, build_same

        mx.random.seed(2 if role == "decoder" else 3)
        same = RELEASED_SAME[name]
        kernel = 3 if (same["family"], role) == ("s", "decoder") else 1  # the SAME-S decoder's output conv
        return build_same(SAMEConfig(role=role, latent_dim=256, io_channels=512, mapping_kernel=kernel, **same))

    return ModuleSource(f"{model} (random weights)", text, dit, codec, codec_name=hub.MODELS[model].codec,
                        codecs=tuple(hub.CODECS))


_TOKENIZER: bytes | None = None


def bench_tokenizer() -> bytes:
    """A small SentencePiece model trained on the spot, in which :data:`BENCH_PROMPT` takes
    about as many pieces as with Gemma's 256k vocabulary (whole words, digits split: 16
    tokens with ``<bos>``), so text encoding and cross-attention cost about what they do
    with the real tokenizer."""
    global _TOKENIZER
    if _TOKENIZER is None:
        import sentencepiece as spm

        # Gemma's pieces for the prompt's words; the model learns each as one piece.
        words = ["warm", "analog", "synth", "arp", "over", "a", "deep", "house", "groove", "BPM", ","]
        lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) + " arpeggio 124" for i in range(300)]
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=80,
                                       model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
                                       hard_vocab_limit=False, split_digits=True)
        _TOKENIZER = out.getvalue()
    return _TOKENIZER


def write_random_bundle(folder: str | Path, models: tuple[str, ...] = ("sm-music",)) -> Path:
    """The official files of ``models`` (text encoder, DiTs, their codecs' encoder and decoder) with
    full-size random weights, in the official names, layouts and dtypes: what ``sa3 bench --cold``
    loads from disk. Files already there are kept (written once)."""
    import json

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from ..models.dit import COND_PREFIX
    from ..weights import save_npz

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def fp16(module) -> dict:
        return {k: np.array(v.astype(mx.float16)) for k, v in tree_flatten(module.parameters())}

    if not (folder / hub.T5GEMMA_FILE).is_file():
        encoder, _ = random_source(models[0])._text()
        arrays = fp16(encoder)
        meta = dict(RELEASED_T5GEMMA, rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=0)
        arrays["META"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        arrays["TOKENIZER_MODEL"] = np.frombuffer(bench_tokenizer(), np.uint8)
        save_npz(folder / hub.T5GEMMA_FILE, arrays)
    for model in models:
        source = random_source(model)
        if not (folder / hub.MODELS[model].dit_file).is_file():
            dit, conditioner = source._dit()
            arrays = fp16(dit)
            arrays.update({COND_PREFIX + k: v for k, v in fp16(conditioner).items()})
            save_npz(folder / hub.MODELS[model].dit_file, arrays)
        for role in ("encoder", "decoder"):
            path = folder / hub.codec_file(source.codec, role)
            if not path.is_file():
                module = source._codec(source.codec, role)
                arrays = {k: np.array(v) for k, v in tree_flatten(module.parameters())}
                save_npz(path, module.to_official_layout(arrays))
    return folder
