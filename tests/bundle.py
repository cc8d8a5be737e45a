"""Build a complete tiny bundle of the eight official weight files, for end-to-end tests.

The files have the official names, key names, layouts and dtypes (``*_f16`` DiTs and
T5Gemma with ``META`` and a real, tiny SentencePiece tokenizer; ``*_f32`` codecs with
the SAME-S decoder's mapping in PyTorch ``[out, in, k]`` layout), with random weights.
Key names and shapes come from our modules at tiny sizes; that they equal the
official full-size key sets is checked against the manifests in the model tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import sentencepiece as spm
from mlx.utils import tree_flatten

from sa3_mlx import hub
from sa3_mlx.models.dit import DiT, DiTConfig
from sa3_mlx.models.same import SAMEConfig, build_same
from sa3_mlx.models.t5gemma import T5GemmaConfig, T5GemmaEncoder

WORDS = (
    "lofi house loop bpm epic orchestral buildup with tribal drums and warm synth bass ambient pad "
    "glass shattering on stone jazz trio brushed drum fill vocals guitar piano strings techno kick snare "
    "hihat rain thunder wind footsteps door creak engine crowd applause bell choir flute cello"
).split()

T5_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 intermediate_size=128, vocab_size=160, rope_theta=10000.0, rms_norm_eps=1e-6,
                 attn_logit_softcapping=50.0, query_pre_attn_scalar=32, pad_token_id=0)


def tiny_tokenizer(vocab_size: int = 160) -> bytes:
    """A SentencePiece BPE model (pad 0, eos 1, bos 2, unk 3, like Gemma's) trained on a word list."""
    rng = np.random.default_rng(7)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(400)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2, hard_vocab_limit=False,
    )
    return out.getvalue()


def random_parameters(module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The module's own initialisation, with all-zero tensors (gates, memory tokens) made random."""
    params = {}
    for name, value in tree_flatten(module.parameters()):
        arr = np.array(value.astype(mx.float32))
        if not arr.any():
            arr = rng.normal(0.0, 0.05, arr.shape).astype(np.float32)
        params[name] = arr
    return params


def _blob(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _dit_file(config: DiTConfig, rng: np.random.Generator, cond_dim: int) -> dict[str, np.ndarray]:
    mx.random.seed(int(rng.integers(1 << 30)))
    arrays = {k: v.astype(np.float16) for k, v in random_parameters(DiT(config), rng).items()}
    arrays["cond.padding_embedding"] = rng.normal(0, 0.5, cond_dim).astype(np.float16)
    arrays["cond.seconds_total_weight"] = rng.normal(0, 0.1, (cond_dim, 256)).astype(np.float16)
    arrays["cond.seconds_total_bias"] = rng.normal(0, 0.1, cond_dim).astype(np.float16)
    return arrays


def build_tiny_bundle(folder: str | Path, seed: int = 0) -> Path:
    """Write the eight official files into ``folder`` (flat) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    t5 = T5GemmaConfig(**T5_CONFIG)
    mx.random.seed(seed)
    t5_arrays = {k: v.astype(np.float16) for k, v in random_parameters(T5GemmaEncoder(t5), rng).items()}
    t5_arrays["META"] = _blob(json.dumps(T5_CONFIG).encode())
    t5_arrays["TOKENIZER_MODEL"] = _blob(tiny_tokenizer(T5_CONFIG["vocab_size"]))
    np.savez(folder / hub.T5GEMMA_FILE, **t5_arrays)

    # The cross-attention tokens are T5Gemma outputs and the seconds embedding: one width.
    cond_dim = t5.hidden_size
    # head_dim 32: the smallest the file can say with upstream's rope rule, max(head_dim // 2, 32).
    common = dict(io_channels=256, head_dim=32, cond_token_dim=cond_dim, global_cond_dim=cond_dim,
                  local_add_cond_dim=257, num_memory_tokens=4, timestep_features_dim=256)
    small = DiTConfig(embed_dim=64, depth=2, num_heads=2, ff_inner=128, differential=False, **common)
    medium = DiTConfig(embed_dim=96, depth=2, num_heads=3, ff_inner=192, differential=True, **common)
    for name, config in (("sm-music", small), ("sm-sfx", small), ("medium", medium)):
        np.savez(folder / hub.MODELS[name].dit_file, **_dit_file(config, rng, cond_dim))

    for codec in hub.CODECS:
        family = "s" if codec == "same-s" else "l"
        for role in ("encoder", "decoder"):
            config = SAMEConfig.tiny(family=family, role=role)
            mx.random.seed(int(rng.integers(1 << 30)))
            module = build_same(config)
            arrays = random_parameters(module, rng)
            arrays = module.to_official_layout(arrays)
            np.savez(folder / hub.codec_file(codec, role), **arrays)
    return folder
