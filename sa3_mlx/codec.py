"""Audio <-> latents through a SAME codec: patching and exact chunked decoding.

The codec works on patches: stereo audio cut into 256-sample frames, both
channels' frames stacked into 512 channels (upstream ``PatchedPretransform``). A
latent covers 16 patches, i.e. 4096 samples.

Chunked decoding is exact. SAME attention is local (chunks in SAME-S, a sliding
window in SAME-L), so a decode window differs from the whole-sequence decode only
in a fixed number of latents at each cut edge (``config.context_latents``), provided
windows start where the model's chunks start (``config.window_grid``). Windows
overlap by those edges, only their exact centres are kept, and windows are stacked
along the batch axis so a whole decode is a few model calls.
"""

from __future__ import annotations

import weakref

import mlx.core as mx

from . import kernels
from .audio import CHANNELS as AUDIO_CHANNELS
from .models.same import SAMEBlock, SAMEDecoder, SAMEEncoder
from .runtime import compile_by_default

PATCH_SIZE = 256  # samples per patch and channel
PATCH_CHANNELS = AUDIO_CHANNELS * PATCH_SIZE
PATCHES_PER_LATENT = 16
SAMPLES_PER_LATENT = PATCH_SIZE * PATCHES_PER_LATENT
LATENT_CHANNELS = 256
# Activation memory one decoder call may use (estimated, see SAMEConfig.activation_bytes_per_latent).
DEFAULT_DECODE_MEMORY = 2 << 30


def patchify(audio: mx.array) -> mx.array:
    """Audio ``[B, 2, N]`` -> patches ``[B, 512, ceil(N / 256)]`` ("b c (l h) -> b (c h) l").

    A partial last patch is completed with silence, as upstream does.
    """
    B, C, N = audio.shape
    if C != AUDIO_CHANNELS:
        raise ValueError(f"audio must have {AUDIO_CHANNELS} channels, got shape {tuple(audio.shape)}")
    pad = -N % PATCH_SIZE
    if pad:
        audio = mx.pad(audio, [(0, 0), (0, 0), (0, pad)])
    L = audio.shape[-1] // PATCH_SIZE
    return audio.reshape(B, C, L, PATCH_SIZE).transpose(0, 1, 3, 2).reshape(B, PATCH_CHANNELS, L)


def unpatchify(patches: mx.array) -> mx.array:
    """Patches ``[B, 512, L]`` -> audio ``[B, 2, 256 L]`` ("b (c h) l -> b c (l h)")."""
    B, CH, L = patches.shape
    if CH != PATCH_CHANNELS:
        raise ValueError(f"patches must have {PATCH_CHANNELS} channels, got shape {tuple(patches.shape)}")
    x = patches.reshape(B, AUDIO_CHANNELS, PATCH_SIZE, L).transpose(0, 1, 3, 2)
    return x.reshape(B, AUDIO_CHANNELS, L * PATCH_SIZE)


def encode(encoder: SAMEEncoder, audio: mx.array) -> mx.array:
    """Audio ``[B, 2, N]`` -> latents ``[B, 256, ceil(N / 4096)]`` (silence-padded). The blocks run plain:
    a data set's files have many lengths, and each new length would trace compiled blocks again."""
    return encoder(patchify(audio))


def plan_windows(length: int, window: int, grid: int, context: tuple[int, int]) -> list[tuple[int, int, int]]:
    """``(start, keep_from, keep_to)`` per window: equal windows whose kept parts tile ``[0, length)``.

    ``length`` and ``window`` are multiples of ``grid``; starts are too. A window
    keeps nothing within ``context`` (left, right) latents of a cut edge; the
    sequence's own ends are not cuts.
    """
    left, right = context
    hop = (window - left - right) // grid * grid
    if window % grid or length % grid or hop < grid:
        raise ValueError(f"window {window} does not fit grid {grid} with context {context}")
    starts = list(range(0, length - window, hop)) + [length - window]
    bounds = [0] + [start + left for start in starts[1:]] + [length]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def _window_length(length: int, max_window: int, grid: int, context: tuple[int, int]) -> int:
    """The shortest window on the grid that needs no more windows than ``max_window`` does."""
    count = len(plan_windows(length, max_window, grid, context))
    for window in range(grid, max_window + 1, grid):
        hop = (window - sum(context)) // grid * grid
        if hop >= grid and (count - 1) * hop + window >= length:
            return window
    return max_window


class CompiledBlock:
    """A SAME block called as the codec calls it (``block(x, window, qkv)``), each way of calling it
    ``mx.compile``d once (per window, first-block projection or not, and kernels backend, which the trace
    bakes in). A GPU then runs the block's element-wise work (DyT norms, GLU, residuals) as a few fused
    kernels instead of one kernel and one memory pass per operation."""

    def __init__(self, block: SAMEBlock):
        self.block = block
        self._traced: dict = {}

    def __call__(self, x: mx.array, window: tuple[int, int] | None = None, qkv: mx.array | None = None):
        key = (window, qkv is None, kernels.active())
        if key not in self._traced:
            block = self.block
            self._traced[key] = (mx.compile(lambda h: block(h, window)) if qkv is None
                                 else mx.compile(lambda h, q: block(h, window, q)))
        return self._traced[key](x) if qkv is None else self._traced[key](x, qkv)


# Compiled blocks per decoder (by id; dropped when the decoder is collected: --free-models frees it).
_COMPILED: dict[int, list[CompiledBlock]] = {}


def compiled_blocks(decoder: SAMEDecoder) -> list[CompiledBlock] | None:
    """``decoder``'s blocks compiled, kept as long as it lives (tracing anew at every decode would cost
    more than it saves), where sampler steps are compiled (GPUs; ``SA3_COMPILE``); else None (the plain
    blocks: on the CPU the block's numpy paths are faster than compiled MLX ops)."""
    if not compile_by_default():
        return None
    key = id(decoder)
    if key not in _COMPILED:
        _COMPILED[key] = [CompiledBlock(block) for block in decoder.blocks]
        weakref.finalize(decoder, _COMPILED.pop, key, None)
    return _COMPILED[key]


def decode(
    decoder: SAMEDecoder,
    latents: mx.array,
    max_window: int | None = None,
    memory_budget: int = DEFAULT_DECODE_MEMORY,
    blocks: list | None = None,
) -> mx.array:
    """Latents ``[B, 256, T]`` -> patches ``[B, 512, 16 T]``, equal to one whole-sequence decode.

    One call when the sequence fits both ``max_window`` (latents) and
    ``memory_budget`` (bytes of activations per call). Otherwise overlapping
    windows on the model's grid, as many stacked per call as the budget allows
    (``max_window`` must leave room for the codec's edge context). ``blocks``: the callables to run as the
    blocks (default :func:`compiled_blocks`, or the plain blocks where steps are not compiled).
    """
    blocks = compiled_blocks(decoder) if blocks is None else blocks
    c = decoder.config
    B, _, T = latents.shape
    grid, context = c.window_grid, c.context_latents
    padded = -(-T // grid) * grid
    itemsize = decoder.project_in.weight.dtype.size
    call_latents = max(1, memory_budget // c.activation_bytes_per_latent(itemsize))
    smallest = -(-(sum(context) + grid) // grid) * grid
    if max_window is not None and max_window < smallest:
        raise ValueError(f"max_window must be at least {smallest} latents for this codec, got {max_window}")
    limit = max(min(max_window or padded, call_latents // B) // grid * grid, smallest)
    if padded <= limit:
        return decoder(latents, blocks)

    hidden = decoder.embed(latents)
    window = _window_length(padded, limit, grid, context)
    plan = plan_windows(padded, window, grid, context)
    per_call = max(1, call_latents // (B * window))
    pieces = []
    for first in range(0, len(plan), per_call):
        group = plan[first : first + per_call]
        stacked = mx.concatenate([hidden[:, start : start + window] for start, _, _ in group], axis=0)
        out = decoder.decode_embedded(stacked, blocks)
        for i, (start, keep_from, keep_to) in enumerate(group):
            span = slice((keep_from - start) * c.stride, (keep_to - start) * c.stride)
            pieces.append(out[i * B : (i + 1) * B, :, span])
        # Evaluate call by call: one lazy graph over all calls would not bound memory.
        mx.eval(pieces[-len(group) :])
    return mx.concatenate(pieces, axis=-1)[..., : T * c.stride]
