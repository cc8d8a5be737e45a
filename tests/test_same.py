"""SAME-S / SAME-L codec: golden outputs, exact chunked decoding, patching, config, strict loading."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from sa3_mlx import codec
from sa3_mlx.models.same import (
    SAMEConfig,
    SAMEDecoder,
    SAMEEncoder,
    build_same,
    family_from_name,
    load_same,
    sanitize,
)
from sa3_mlx.weights import WeightDict, WeightError

from .util import assert_close, load_case

# Measured against the official MLX port (fp32 CPU): decoders 1.7e-6 max abs on outputs up to
# 2.6, encoders 6e-7 on latents up to 1.4 (a few ulps; upstream PyTorch vs that port: 2.3e-6 /
# 6.9e-7). ~3x headroom for other BLAS summation orders.
ATOL_DECODER = 5e-6
ATOL_ENCODER = 2e-6
# Chunked vs whole decode: SAME-S measures 0 (windows recompute the very same chunks), SAME-L
# 2.1e-6 (RoPE positions restart in each window, so rounding differs; the math is equal).
ATOL_CHUNKED = 5e-6


def golden_weights(golden, family: str, role: str) -> WeightDict:
    name = f"same_{family}_{role}_tiny_f32.npz"
    with np.load(golden / name) as f:
        return WeightDict({k: f[k] for k in f.files}, name)


def tiny_overrides(golden, family: str, role: str) -> dict:
    """The tiny SAME-L decoder has sin gates on its last 2 of 4 blocks (upstream sinusoidal_blocks 3)."""
    if family == "l" and role == "decoder":
        config = json.loads((golden / "same_l_tiny_config.json").read_text())
        return {"sinusoidal_blocks": config["torch_sinusoidal_blocks"]}
    return {}


def load_tiny(golden, family: str, role: str, weights: Mapping | None = None):
    weights = weights if weights is not None else golden_weights(golden, family, role)
    return load_same(weights, role, **tiny_overrides(golden, family, role))


@pytest.fixture(scope="module")
def decoders(golden) -> dict[str, SAMEDecoder]:
    return {f: load_tiny(golden, f, "decoder") for f in ("s", "l")}


@pytest.fixture(scope="module")
def encoders(golden) -> dict[str, SAMEEncoder]:
    return {f: load_tiny(golden, f, "encoder") for f in ("s", "l")}


def random_latents(batch: int, length: int, seed: int) -> mx.array:
    return mx.random.normal((batch, codec.LATENT_CHANNELS, length), key=mx.random.key(seed))


# ---------------------------------------------------------------- golden


@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("suffix", ["", "_b2"])
def test_decoder_matches_golden(golden, decoders, family, suffix):
    case = load_case(golden, f"case_same_{family}_decoder.npz")
    patches = decoders[family](mx.array(case["latents" + suffix]))
    assert_close(patches, case["patches" + suffix], ATOL_DECODER, what=f"SAME-{family} patches{suffix}")


@pytest.mark.parametrize("family", ["s", "l"])
def test_encoder_matches_golden(golden, encoders, family):
    case = load_case(golden, f"case_same_{family}_encoder.npz")
    latents = encoders[family](mx.array(case["audio_patches"]))
    assert_close(latents, case["latents"], ATOL_ENCODER, what=f"SAME-{family} latents")
    assert_close(latents, case["torch_latents"], ATOL_ENCODER, what=f"SAME-{family} vs PyTorch")
    # From raw audio: patchify is exactly the golden patching.
    assert np.array_equal(np.array(codec.patchify(mx.array(case["audio"]))), case["audio_patches"])
    assert np.array_equal(np.array(codec.encode(encoders[family], mx.array(case["audio"]))), np.array(latents))


# ---------------------------------------------------------------- chunked decoding


class CountingDecoder:
    """Records the input shape of every windowed model call."""

    def __init__(self, decoder: SAMEDecoder):
        self.decoder = decoder
        self.config = decoder.config
        self.project_in = decoder.project_in
        self.blocks = decoder.blocks
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, latents, blocks=None):
        self.calls.append(tuple(latents.shape))
        return self.decoder(latents, blocks)

    def embed(self, latents):
        return self.decoder.embed(latents)

    def decode_embedded(self, hidden, blocks=None):
        self.calls.append(tuple(hidden.shape))
        return self.decoder.decode_embedded(hidden, blocks)


@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("length", [20, 21, 30])
def test_chunked_decode_is_exact(decoders, family, length):
    decoder = decoders[family]
    latents = random_latents(2, length, seed=length)
    whole = decoder(latents)
    counting = CountingDecoder(decoder)
    chunked = codec.decode(counting, latents, max_window=8 if family == "s" else 12)
    windows = sum(shape[0] for shape in counting.calls) // 2
    assert 3 <= windows <= 8 and len(counting.calls) == 1, counting.calls
    assert chunked.shape == (2, codec.PATCH_CHANNELS, 16 * length)
    assert_close(chunked, whole, ATOL_CHUNKED, what=f"SAME-{family} chunked T={length}")


@pytest.mark.parametrize("family", ["s", "l"])
def test_chunked_decode_respects_memory_budget(decoders, family):
    decoder = decoders[family]
    latents = random_latents(2, 30, seed=3)
    window = 12
    budget = 2 * window * 2 * decoder.config.activation_bytes_per_latent()  # two windows of two rows
    counting = CountingDecoder(decoder)
    chunked = codec.decode(counting, latents, max_window=window, memory_budget=budget)
    assert len(counting.calls) >= 2 and all(shape[0] <= 4 for shape in counting.calls), counting.calls
    assert_close(chunked, decoder(latents), ATOL_CHUNKED, what=f"SAME-{family} budgeted chunks")


@pytest.mark.parametrize("family", ["s", "l"])
def test_decode_unchunked_when_it_fits(decoders, family):
    counting = CountingDecoder(decoders[family])
    codec.decode(counting, random_latents(1, 20, seed=4))
    assert counting.calls == [(1, codec.LATENT_CHANNELS, 20)]


def test_max_window_below_context_is_refused(decoders):
    left, right = decoders["l"].config.context_latents
    with pytest.raises(ValueError, match="max_window"):
        codec.decode(decoders["l"], random_latents(1, 30, seed=5), max_window=left + right)


def per_latent_error(decoder: SAMEDecoder, latents: mx.array, start: int, stop: int) -> np.ndarray:
    """Max error of each latent's patches when only ``latents[start:stop]`` is decoded."""
    whole = np.array(decoder(latents))[..., 16 * start : 16 * stop]
    window = np.array(decoder(latents[..., start:stop]))
    return np.abs(window - whole).reshape(-1, stop - start, 16).max(axis=(0, 2))


@pytest.mark.parametrize("family", ["s", "l"])
def test_context_latents_cover_the_receptive_field(decoders, family):
    decoder = decoders[family]
    config = decoder.config
    left, right = config.context_latents
    assert (left, right) == ((2, 2) if family == "s" else (4, 4))
    start, stop = 6, 18  # on the SAME-S chunk grid
    error = per_latent_error(decoder, random_latents(1, 24, seed=6), start, stop)
    assert error[left : stop - start - right].max() <= ATOL_CHUNKED, error
    if family == "s":
        # SAME-S context is tight: the latent just inside it is visibly off, on both sides.
        assert error[left - 1] > 1e-3 and error[-right] > 1e-3, error
        # And the grid matters: a window starting off the chunk grid is wrong everywhere.
        assert per_latent_error(decoder, random_latents(1, 24, seed=6), start + 1, stop + 1).min() > 1e-3


def official_chunked_decode(decoder: SAMEDecoder, latents: mx.array, chunk: int, overlap: int) -> mx.array:
    """The official MLX SAME-L ``decode_chunked`` scheme: windows of chunk + 2 overlap latents,
    keeping the first chunk + overlap, then chunk-long middles, then what remains of the last."""
    T = latents.shape[-1]
    kernel = chunk + 2 * overlap
    pieces = [decoder(latents[..., :kernel])[..., : (chunk + overlap) * 16]]
    i = chunk + overlap
    while i + chunk + overlap <= T:
        window = decoder(latents[..., i - overlap : i + chunk + overlap])
        pieces.append(window[..., overlap * 16 : (overlap + chunk) * 16])
        i += chunk
    if T > i:
        pieces.append(decoder(latents[..., T - kernel :])[..., -(T - i) * 16 :])
    return mx.concatenate(pieces, axis=-1)


def test_official_samel_chunking_is_exact_only_with_overlap_beyond_receptive_field(golden, decoders):
    """The official SAME-L scheme stitches at a fixed overlap (real model: 8 < 12 blocks x 1 latent).

    The golden chunked decode (chunk 8, overlap 4) is exact only because the tiny model
    has 4 blocks; an overlap inside the receptive field visibly changes the audio,
    while codec.decode sizes its overlap from the structure.
    """
    decoder = decoders["l"]
    case = load_case(golden, "case_same_l_decoder.npz")
    assert (int(case["chunk_size"]), int(case["overlap"])) == (8, 4)
    assert decoder.config.num_blocks * decoder.config.sliding_window[0] == 4
    assert_close(case["patches_chunked"], case["patches"], ATOL_CHUNKED, what="official chunk 8 / overlap 4")

    latents = mx.array(case["latents"])
    whole = decoder(latents)
    short_overlap = official_chunked_decode(decoder, latents, chunk=8, overlap=1)
    assert float(mx.abs(short_overlap - whole).max()) > 1e-4
    assert_close(codec.decode(decoder, latents, max_window=10), whole, ATOL_CHUNKED, what="ours")


# ---------------------------------------------------------------- patching


def test_patch_round_trip_and_layout():
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, (2, 2, 4 * codec.SAMPLES_PER_LATENT)).astype(np.float32)
    patches = np.array(codec.patchify(mx.array(audio)))
    assert patches.shape == (2, codec.PATCH_CHANNELS, 4 * 16)
    # README convention: audio = patches.reshape(B,2,256,L).transpose(0,1,3,2).reshape(B,2,256L)
    B, _, L = patches.shape
    assert np.array_equal(patches.reshape(B, 2, 256, L).transpose(0, 1, 3, 2).reshape(B, 2, 256 * L), audio)
    assert np.array_equal(np.array(codec.unpatchify(mx.array(patches))), audio)
    # Channel c, sample 256 l + h sits at patch channel 256 c + h, position l.
    assert patches[1, 256 + 7, 3] == audio[1, 1, 256 * 3 + 7]


def test_partial_patch_is_padded_with_silence(encoders):
    audio = np.random.default_rng(1).uniform(-1, 1, (1, 2, 5000)).astype(np.float32)
    patches = np.array(codec.patchify(mx.array(audio)))
    assert patches.shape == (1, codec.PATCH_CHANNELS, 20)
    assert np.array_equal(np.array(codec.unpatchify(mx.array(patches)))[..., :5000], audio)
    assert codec.encode(encoders["s"], mx.array(audio)).shape == (1, codec.LATENT_CHANNELS, 2)


# ---------------------------------------------------------------- config inference


@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_config_from_golden_files(golden, decoders, encoders, family, role):
    config = (decoders if role == "decoder" else encoders)[family].config
    tiny = json.loads((golden / f"same_{family}_tiny_config.json").read_text())
    assert (config.dim, config.num_heads, config.head_dim) == (tiny["DIM"], tiny["NUM_HEADS"], tiny["HEAD_DIM"])
    assert (config.rope_dims, config.num_blocks, config.ff_inner) == (
        tiny["ROPE_DIMS"], tiny["NUM_BLOCKS"], tiny["FF_INNER"]
    )
    assert (config.latent_dim, config.io_channels, config.stride) == (
        tiny["LATENT_DIM"], tiny["IO_AUDIO_CHANNELS"], tiny["STRIDE"]
    )
    assert config.tokens_per_latent == tiny["SUB_CHUNK"]
    if family == "s":
        assert (config.chunk_tokens, config.shift_tokens) == (tiny["EFFECTIVE_CHUNK"], tiny["SHIFT"])
        kernel = tiny["decoder_conv_mapping_kernel"] if role == "decoder" else tiny["encoder_mapping_kernel"]
    else:
        assert config.sliding_window == tuple(tiny["sliding_window_latents"])
        kernel = tiny[f"{role}_mapping_kernel"]
        sin_blocks = [i for i in range(config.num_blocks) if config.uses_sin_gate(i)]
        assert sin_blocks == (list(range(tiny["SIN_START_BLOCK"], config.num_blocks)) if role == "decoder" else [])
    assert config.mapping_kernel == kernel
    assert config == SAMEConfig.tiny(family, role)


class ShapeOnlyWeights(Mapping):
    """Keys and shapes of a manifest; reading a tensor fails (config inference must not)."""

    def __init__(self, manifest: dict, name: str):
        self.shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
        self.name = name

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def __getitem__(self, key: str):
        raise AssertionError(f"tensor '{key}' was read")

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


FULL_SIZE = {
    # family: dim, heads, blocks, ff_inner
    "s": (768, 12, 6, 2304),
    "l": (1536, 24, 12, 4608),
}


@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_config_from_full_size_manifests(manifests, family, role):
    name = f"same_{family}_{role}"
    weights = ShapeOnlyWeights(json.loads((manifests / f"{name}.json").read_text()), f"{name}_f32.npz")
    config = SAMEConfig.from_weights(weights, family_from_name(weights.name), role)
    dim, heads, blocks, ff_inner = FULL_SIZE[family]
    assert (config.dim, config.num_heads, config.head_dim, config.rope_dims) == (dim, heads, 64, 32)
    assert (config.num_blocks, config.ff_inner, config.latent_dim, config.io_channels) == (blocks, ff_inner, 256, 512)
    assert config.mapping_kernel == (3 if (family, role) == ("s", "decoder") else 1)
    sin_blocks = [i for i in range(blocks) if config.uses_sin_gate(i)]
    assert sin_blocks == (list(range(5, 12)) if (family, role) == ("l", "decoder") else [])

    # The full-size module (built lazily, never evaluated) expects exactly the manifest's keys.
    model = build_same(config)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    fixed = sanitize(weights, config)
    assert {k: fixed.shape(k) for k in fixed} == expected


# ---------------------------------------------------------------- strict loading


def test_family_from_file_name():
    assert family_from_name("same_s_decoder_f32.npz") == "s"
    assert family_from_name("/x/MLX/same_l_encoder_f32.npz") == "l"
    with pytest.raises(WeightError, match="family"):
        family_from_name("codec.npz")


def edited(weights: WeightDict, drop: str = "", add: dict | None = None) -> WeightDict:
    arrays = {k: v for k, v in weights.items() if k != drop}
    arrays.update(add or {})
    return WeightDict(arrays, weights.name)


def test_missing_renamed_and_misshaped_keys_are_errors(golden):
    weights = golden_weights(golden, "s", "decoder")
    key = "blocks.1.attn.k_norm.alpha"
    with pytest.raises(WeightError, match=rf"same_s_decoder_tiny_f32\.npz: missing key '{key}'"):
        load_same(edited(weights, drop=key), "decoder")

    old, new = "blocks.2.ff.glu_proj.weight", "blocks.2.ff.ff.0.proj.weight"
    with pytest.raises(WeightError) as info:
        load_same(edited(weights, drop=old, add={new: weights[old]}), "decoder")
    assert f"missing key '{old}'" in str(info.value) and f"unexpected key '{new}'" in str(info.value)

    key = "blocks.0.ff.proj_out.bias"
    with pytest.raises(WeightError, match=rf"key '{key}' has shape \[32\], expected \[64\]"):
        load_same(edited(weights, add={key: weights[key][:32]}), "decoder")

    with pytest.raises(WeightError, match="'project_in.weight'"):
        load_same(edited(weights, drop="project_in.weight"), "decoder")


@pytest.mark.parametrize(
    "family, role, layouts",
    [
        ("s", "decoder", [lambda w: w, lambda w: w.transpose(0, 2, 1)]),  # PyTorch [O,I,3], MLX [O,3,I]
        ("l", "decoder", [lambda w: w, lambda w: w.transpose(0, 2, 1), lambda w: w[..., 0]]),
        ("s", "encoder", [lambda w: w, lambda w: w.transpose(0, 2, 1), lambda w: w[..., 0]]),
    ],
)
def test_mapping_weight_layouts(golden, family, role, layouts):
    weights = golden_weights(golden, family, role)
    inputs = random_latents(1, 4, seed=7) if role == "decoder" else mx.random.normal((1, 512, 64), key=mx.random.key(7))
    outputs = []
    for layout in layouts:
        mapping = np.ascontiguousarray(layout(weights["mapping.weight"]))
        model = load_tiny(golden, family, role, edited(weights, add={"mapping.weight": mapping}))
        outputs.append(np.array(model(inputs)))
    for out in outputs[1:]:
        assert np.array_equal(out, outputs[0])


@pytest.mark.parametrize("family", ["s", "l"])
@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_official_layout_round_trip(family, role):
    config = SAMEConfig.tiny(family, role)
    module = build_same(config)
    arrays = {k: np.array(v) for k, v in tree_flatten(module.parameters())}
    official = module.to_official_layout(arrays)
    out_ch, in_ch = (512, 64) if role == "decoder" else (64, 512)
    assert official["mapping.weight"].shape == (out_ch, in_ch, config.mapping_kernel)  # PyTorch Conv1d
    overrides = {"sinusoidal_blocks": config.sinusoidal_blocks} if role == "decoder" else {}
    loaded = load_same(WeightDict(official, f"same_{family}_{role}_f32.npz"), role, **overrides)
    assert loaded.config == config
    for key, value in tree_flatten(loaded.parameters()):
        assert np.array_equal(np.array(value), arrays[key]), key


@pytest.mark.parametrize("family", ["s", "l"])
def test_compiled_blocks_decode_as_the_plain_ones_and_live_as_long_as_the_decoder(family, monkeypatch):
    """GPUs decode with each block compiled (codec.compiled_blocks): the same output, whole and in windows,
    and the compiled functions are dropped with their decoder (--free-models)."""
    import gc

    decoder = build_same(SAMEConfig.tiny(family, "decoder"))
    mx.eval(decoder.parameters())
    latents = mx.random.normal((1, 256, 40), key=mx.random.key(3))
    plain = np.array(codec.decode(decoder, latents, blocks=decoder.blocks))
    monkeypatch.setenv("SA3_COMPILE", "1")
    blocks = codec.compiled_blocks(decoder)
    assert blocks is codec.compiled_blocks(decoder) and len(blocks) == len(decoder.blocks)
    np.testing.assert_allclose(np.array(codec.decode(decoder, latents)), plain, atol=1e-5)
    windowed = np.array(codec.decode(decoder, latents, max_window=16))  # 40 latents: several windows
    np.testing.assert_allclose(windowed, plain, atol=1e-5)
    key = id(decoder)
    del decoder, blocks
    gc.collect()
    assert key not in codec._COMPILED
    monkeypatch.setenv("SA3_COMPILE", "0")
    assert codec.compiled_blocks(build_same(SAMEConfig.tiny(family, "decoder"))) is None
