"""NVIDIA GPUs (MLX's CUDA backend): the reference ops, with the attention heads made by one kernel.

A sampler step on a GPU is bound by the host: MLX spends 1-23 us of host time queueing each graph
node, whatever the node computes, so a step costs about as much host time as the GPU needs for it
(docs/performance.md, "GPU sampling"). Making a self-attention's heads in plain MLX ops is a dozen
nodes (three slices, three reshapes and transposes with their copies, two RMS norms and two RoPEs,
twice that with differential heads); :meth:`CUDAKernels.heads` makes them in one custom kernel
(``mx.fast.cuda_kernel``) that reads the projection once and writes every head set contiguous
``[B, H, N, D]``, the layout the attention kernel reads best.

The kernel computes in fp32 and rounds once per output (the plain ops round after the norm and again
after RoPE), so in half precision it is as close to fp32 or closer; in fp32 it equals the plain ops to
float rounding. Anything it does not cover (other norms' parameters, ranks, widths over
:data:`MAX_HEAD_DIM`, arrays being differentiated: custom kernels have no gradient) takes the
reference. Metal has no twin of it: Macs run the reference ops, with the same results.

Results leave the device through :meth:`CUDAKernels.to_numpy`: the CUDA runtime's copy of MLX's managed memory
into numpy (``cudaMemcpy``), a third of the time numpy's own page-by-page reads take.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
import sys

import mlx.core as mx
import numpy as np

from . import DyTParams, Kernels, NormParams, RMSNormParams

MAX_HEAD_DIM = 256
WARPS_PER_BLOCK = 4  # rows (one per warp) per thread block

# Kernels.local_attention: warps per thread block, the most keys one query may see, the shared memory a
# block may use (the static limit), and the most tokens a sequence attended whole may have.
LOCAL_WARPS = 4
LOCAL_MAX_KEYS = 64
LOCAL_SHARED_BYTES = 48 * 1024
LOCAL_MAX_WHOLE = 64
# The tensor-core form (half precision, a window): the most keys 16 queries may see together.
BANDED_MAX_SPAN = 128

# Head set kinds of Kernels.heads, as the kernel numbers them.
_KIND = {"q": 0, "k": 1, "v": 2}


class CUDAKernels(Kernels):
    """The reference ops, with :meth:`heads` as one CUDA kernel where it applies."""

    name = "cuda"

    def heads(
        self,
        x: mx.array,
        num_heads: int,
        kinds: str,
        q_norm: NormParams | None = None,
        k_norm: NormParams | None = None,
        rope_dims: int = 0,
        rope_base: float = 10000.0,
        value_mask: mx.array | None = None,
    ) -> list[mx.array]:
        if not _kernel_applies(x, num_heads, kinds, q_norm, k_norm, rope_dims):
            return super().heads(x, num_heads, kinds, q_norm, k_norm, rope_dims, rope_base, value_mask)
        B, N, width = x.shape
        head_dim = width // (len(kinds) * num_heads)
        norms = _norms_used(kinds, q_norm, k_norm)
        dyt = bool(norms) and isinstance(norms[0], DyTParams)
        inputs = [x]
        for params in norms:
            inputs += [params.alpha, params.gamma, params.beta] if dyt else [params.weight]
        masked = value_mask is not None and "v" in kinds
        if masked:
            inputs.append(value_mask.reshape(B, N))
        eps = norms[0].eps if norms and not dyt else None
        kernel = _kernel(heads_source, kinds, head_dim, num_heads, rope_dims, float(rope_base), dyt, eps, masked)
        warps = B * N * num_heads  # one per (token, head), for all of its head sets
        return kernel(
            inputs=inputs,
            template=[("T", x.dtype)],
            grid=(32 * warps, 1, 1),
            threadgroup=(32 * WARPS_PER_BLOCK, 1, 1),
            output_shapes=[(B, num_heads, N, head_dim)] * len(kinds),
            output_dtypes=[x.dtype] * len(kinds),
        )

    def local_attention(
        self,
        queries: list[mx.array],
        keys: list[mx.array],
        values: mx.array,
        scale: float,
        window: tuple[int, int] | None = None,
        group: int = 1,
        merged: bool = False,
    ) -> mx.array:
        B, H, N, D = values.shape
        sets = len(queries)
        banded = _banded_mma_plan(queries, keys, values, window, group)
        if banded is not None:  # half precision, a window: tensor cores, 16 queries per warp
            left, right, warps, span = banded
            bf16 = values.dtype == mx.bfloat16
            kernel = _kernel(banded_mma_source, D, sets, left, right, warps, span, float(scale), bf16, merged)
            queries_per_block = 16 * warps
        else:
            plan = _local_plan(queries, keys, values, window, group)
            if plan is None:
                return super().local_attention(queries, keys, values, scale, window, group, merged)
            left, right, tile, keys_max = plan
            kernel = _kernel(local_attention_source, D, sets, left, right, tile, keys_max, float(scale), merged)
            warps, queries_per_block = LOCAL_WARPS, tile
        blocks = B * H * -(-N // queries_per_block)
        return kernel(
            inputs=[*queries, *keys, values],
            template=[("T", values.dtype)],
            grid=(32 * warps * blocks, 1, 1),
            threadgroup=(32 * warps, 1, 1),
            output_shapes=[(B, N, H * D) if merged else values.shape],
            output_dtypes=[values.dtype],
        )[0]

    def to_numpy(self, x: mx.array) -> np.ndarray:
        """As the reference, with the bytes moved by the CUDA runtime's copy engine (``cudaMemcpy``,
        ``cudaMemcpy2D`` for a slice of rows) instead of numpy reading MLX's managed memory from the
        host, which faults it over page by page: 42 MB of audio (120 s) 15 -> 5 ms on an H200. Falls
        back to the reference where the runtime library is missing or a copy fails."""
        runtime = cuda_runtime()
        if runtime is None or x.dtype == mx.bfloat16 or x.size == 0:  # numpy has no bfloat16
            return super().to_numpy(x)
        mx.eval(x)
        view = np.asarray(x)  # a view of MLX's buffer (strided for a slice); no byte is read here
        plan = host_copy_plan(view)
        if plan is None:  # a layout that is not rows of one pitch: make it contiguous on the device first
            x = mx.contiguous(x)
            mx.eval(x)
            view = np.asarray(x)
            plan = host_copy_plan(view)
        out = np.empty(view.shape, view.dtype)
        rows, width, pitch = plan
        if runtime.copy_rows(out.ctypes.data, view.ctypes.data, rows, width, pitch):
            return out
        return super().to_numpy(x)


class CUDARuntime:
    """The two copies :meth:`CUDAKernels.to_numpy` needs, from the CUDA runtime library MLX's CUDA
    backend runs on (``libcudart``; the driver routes a copy of any two addresses, ``cudaMemcpyDefault``).
    A failed call (non-zero status) returns False and turns the runtime off for the process."""

    MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the addresses (unified addressing)

    def __init__(self, library: ctypes.CDLL):
        self._memcpy = library.cudaMemcpy
        self._memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._memcpy.restype = ctypes.c_int
        self._memcpy2d = library.cudaMemcpy2D
        self._memcpy2d.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        self._memcpy2d.restype = ctypes.c_int
        self.working = True

    def copy_rows(self, dst: int, src: int, rows: int, width: int, pitch: int) -> bool:
        """Copy ``rows`` rows of ``width`` bytes, ``pitch`` bytes apart at ``src``, packed to ``dst``."""
        if not self.working:
            return False
        if rows == 1 or pitch == width:
            status = self._memcpy(dst, src, rows * width, self.MEMCPY_DEFAULT)
        else:
            status = self._memcpy2d(dst, width, src, pitch, width, rows, self.MEMCPY_DEFAULT)
        self.working = status == 0
        return self.working


CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


@functools.cache
def cuda_runtime() -> CUDARuntime | None:
    """The process's CUDA runtime (the library already loaded for MLX when it is; else the one of the
    ``nvidia-cuda-runtime`` wheels on ``sys.path``), None without an NVIDIA GPU or the library."""
    if not mx.cuda.is_available():
        return None
    candidates = list(CUDART_NAMES)
    for root in sys.path:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    for name in candidates:
        try:
            return CUDARuntime(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


def host_copy_plan(view: np.ndarray) -> tuple[int, int, int] | None:
    """``(rows, width, pitch)`` in bytes when ``view``'s elements are rows of contiguous elements, each
    ``pitch`` bytes after the last (a C-contiguous array: one row; a slice of the last axis: one row per
    leading index); None for any other layout."""
    shape = [n for n in view.shape if n != 1] or [1]
    strides = [t for n, t in zip(view.shape, view.strides) if n != 1] or [view.itemsize]
    if strides[-1] != view.itemsize:
        return None
    width = shape[-1] * view.itemsize
    if len(shape) == 1:
        return 1, width, width
    for i in range(len(shape) - 2):  # the leading axes must fold into one axis of rows
        if strides[i] != shape[i + 1] * strides[i + 1]:
            return None
    rows, pitch = math.prod(shape[:-1]), strides[-2]
    if pitch == width:  # C-contiguous
        return 1, rows * width, rows * width
    return (rows, width, pitch) if pitch > width else None


def _norms_used(kinds: str, q_norm, k_norm) -> list:
    """The norms of the query and key parts ``kinds`` has, in the kernel's input order (q, then k)."""
    return [norm for kind, norm in (("q", q_norm), ("k", k_norm)) if kind in kinds]


def _kernel_applies(x, num_heads, kinds, q_norm, k_norm, rope_dims) -> bool:
    if x.ndim != 3 or x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return False
    if x.shape[-1] % (len(kinds) * num_heads):
        return False
    head_dim = x.shape[-1] // (len(kinds) * num_heads)
    if head_dim > MAX_HEAD_DIM or rope_dims > head_dim or rope_dims % 2:
        return False
    norms = _norms_used(kinds, q_norm, k_norm)
    if any(n is None for n in norms) or len({type(n) for n in norms}) > 1:
        return False
    if norms and not isinstance(norms[0], (RMSNormParams, DyTParams)):
        return False
    return True


def _float_literal(value: float) -> str:
    return repr(float(value)) + "f" if math.isfinite(value) else "0.0f"


@functools.cache
def _kernel(source_of, *config):
    """The kernel ``source_of(*config)`` describes, built once per configuration (its constants are compiled
    in, so each has its own name)."""
    name, inputs, outputs, source = source_of(*config)
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source)


def heads_source(kinds: str, head_dim: int, num_heads: int, rope_dims: int, rope_base: float, dyt: bool,
                 eps: float | None, masked: bool) -> tuple[str, list[str], list[str], str]:
    """``(name, input names, output names, body)`` of the heads kernel for one configuration.

    One warp per (token, head), making that head's row of ``head_dim`` features in every set (a warp
    reads and writes 2 * head_dim contiguous bytes per row); the RoPE angles of the token are formed once
    for all of its query and key rows, and each row goes through shared memory for RoPE's pairing of
    feature i with i + rope_dims / 2.
    """
    names = ["x"]
    for kind in "qk":
        if kind in kinds:
            names += [f"{kind}_alpha", f"{kind}_gamma", f"{kind}_beta"] if dyt else [f"{kind}_weight"]
    if masked:
        names.append("mask")
    outputs = [f"out{i}" for i in range(len(kinds))]
    sets = len(kinds)
    per_lane = -(-head_dim // 32)
    kind_of_set = ", ".join(str(_KIND[k]) for k in kinds)
    pick_out = "\n".join(f"    if (s == {i}) dst = out{i};" for i in range(sets))
    log2_base = math.log2(rope_base) if rope_dims else 0.0

    def norm_code(kind: str) -> str:
        if dyt:
            return f"""
        float alpha = static_cast<float>({kind}_alpha[0]);
        for (int j = 0; j < PER_LANE; ++j) {{
            int i = lane + 32 * j;
            if (i < D) v[j] = static_cast<float>({kind}_gamma[i]) * tanhf(alpha * v[j])
                              + static_cast<float>({kind}_beta[i]);
        }}"""
        return f"""
        float inv = rsqrtf(ss / D + EPS);
        for (int j = 0; j < PER_LANE; ++j) {{
            int i = lane + 32 * j;
            if (i < D) v[j] = v[j] * inv * static_cast<float>({kind}_weight[i]);
        }}"""

    angles_code = "" if not rope_dims else """
    // The token's RoPE angles, as MLX's own kernel forms them, once for all of its q and k rows.
    constexpr int HALF = ROPE / 2;
    float cos_of[PER_LANE], sin_of[PER_LANE];
    for (int j = 0; j < PER_LANE; ++j) {
        int i = lane + 32 * j;
        cos_of[j] = 1.0f;
        sin_of[j] = 0.0f;
        if (i < ROPE) {
            int p = i < HALF ? i : i - HALF;
            float inv_freq = exp2f(-(static_cast<float>(p) / static_cast<float>(HALF)) * LOG2_BASE);
            float theta = static_cast<float>(n) * inv_freq;
            float c, sn;
            sincosf(theta, &sn, &c);
            cos_of[j] = c;
            sin_of[j] = sn;
        }
    }
"""
    rope_code = "" if not rope_dims else """
    if (kind != 2) {
        for (int j = 0; j < PER_LANE; ++j) {
            int i = lane + 32 * j;
            if (i < D) rows[warp][i] = v[j];
        }
        __syncwarp();
        for (int j = 0; j < PER_LANE; ++j) {
            int i = lane + 32 * j;
            if (i < ROPE) {
                int p = i < HALF ? i : i - HALF;
                float x1 = rows[warp][p], x2 = rows[warp][p + HALF];
                v[j] = i < HALF ? x1 * cos_of[j] - x2 * sin_of[j] : x1 * sin_of[j] + x2 * cos_of[j];
            }
        }
        __syncwarp();  // the next set's row overwrites this one
    }
"""
    source = f"""
    constexpr int D = {head_dim};
    constexpr int H = {num_heads};
    constexpr int S = {sets};
    constexpr int PER_LANE = {per_lane};
    constexpr int ROPE = {rope_dims};
    constexpr float EPS = {_float_literal(eps or 0.0)};
    constexpr float LOG2_BASE = {_float_literal(log2_base)};
    const int kind_of_set[S] = {{{kind_of_set}}};
    __shared__ float rows[{WARPS_PER_BLOCK}][D];

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const long N = x_shape[1];
    const long item = (long)blockIdx.x * {WARPS_PER_BLOCK} + warp;  // (token, head)
    if (item >= (long)x_shape[0] * N * H) return;
    const int h = item % H;
    const long bn = item / H;
    const long n = bn % N;
    const long b = bn / N;
{angles_code}
    for (int s = 0; s < S; ++s) {{
    const int kind = kind_of_set[s];
    const T* src = x + ((bn * S + s) * H + h) * D;
    float v[PER_LANE];
    float ss = 0.0f;
    for (int j = 0; j < PER_LANE; ++j) {{
        int i = lane + 32 * j;
        v[j] = i < D ? static_cast<float>(src[i]) : 0.0f;
        ss += v[j] * v[j];
    }}
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffff, ss, offset);
    {"if (kind == 0) {" + norm_code("q") + "}" if "q" in kinds else ""}
    {"if (kind == 1) {" + norm_code("k") + "}" if "k" in kinds else ""}
{rope_code}    {"if (kind == 2) { float m = static_cast<float>(mask[b * N + n]); for (int j = 0; j < PER_LANE; ++j) v[j] *= m; }" if masked else ""}
    T* dst = out0;
{pick_out}
    dst += ((b * H + h) * N + n) * D;
    for (int j = 0; j < PER_LANE; ++j) {{
        int i = lane + 32 * j;
        if (i < D) dst[i] = static_cast<T>(v[j]);
    }}
    }}
"""
    tag = (f"{kinds}_d{head_dim}_h{num_heads}_r{rope_dims}_b{int(rope_base * 1000)}_"
           f"{'dyt' if dyt else 'rms' + format(eps or 0.0, '.0e').replace('-', 'm').replace('+', 'p')}"
           f"{'_m' if masked else ''}")
    return f"sa3_heads_{tag}", names, outputs, source


def _local_shared_bytes(head_dim: int, sets: int, keys: int) -> int:
    """Shared memory of one local-attention block: its keys' rows (padded by one float against bank
    conflicts) for every set and the values, plus each warp's weights."""
    return 4 * (keys * (head_dim + 1) * (sets + 1) + LOCAL_WARPS * keys)


def _local_heads_apply(queries, keys, values, dtypes) -> bool:
    """Whether the local-attention kernels take these heads: one or two query/key sets, all ``[B, H, N, D]``
    of one shape and one of ``dtypes``, ``D`` a multiple of 32 up to 128."""
    if len(queries) not in (1, 2) or len(keys) != len(queries):
        return False
    if values.ndim != 4 or values.dtype not in dtypes:
        return False
    if any(a.shape != values.shape or a.dtype != values.dtype for a in [*queries, *keys]):
        return False
    D = values.shape[3]
    return D % 32 == 0 and D <= 128


def _local_plan(queries, keys, values, window, group) -> tuple[int, int, int, int] | None:
    """``(left, right, tile, keys)`` for the kernel (tokens a query sees on each side, queries per block, the
    most keys a block holds), or None where it does not apply (then the reference runs)."""
    if not _local_heads_apply(queries, keys, values, (mx.float16, mx.bfloat16, mx.float32)):
        return None
    N, D = values.shape[2], values.shape[3]
    sets = len(queries)
    if window is None:
        # Every key: one block holds the whole sequence (SAME-S's chunks of 34 tokens).
        if N > LOCAL_MAX_WHOLE or _local_shared_bytes(D, sets, N) > LOCAL_SHARED_BYTES:
            return None
        return N, N, N, N
    left, right = window[0] * group, window[1] * group
    if left < 0 or right < 0 or left + right + 1 > LOCAL_MAX_KEYS:
        return None
    for tile in (32, 16, 8):
        if _local_shared_bytes(D, sets, tile + left + right) <= LOCAL_SHARED_BYTES:
            return left, right, tile, tile + left + right
    return None


def local_attention_source(head_dim: int, sets: int, left: int, right: int, tile: int, keys_max: int,
                           scale: float, merged: bool = False) -> tuple[str, list[str], list[str], str]:
    """``(name, input names, output names, body)`` of the local-attention kernel for one configuration.

    A block takes ``tile`` queries of one (batch, head) and copies the keys they can see (at most
    ``keys_max``) and their values into shared memory as fp32; a warp then takes one query
    at a time: the query in registers, a lane per key for the scores (the key rows padded by one
    float, so 32 lanes read 32 banks), the softmax by warp shuffles, the second set's weights
    subtracted from the first's, and a lane per feature (``head_dim / 32`` each) for the weighted sum
    of the values. One rounding, at the end. ``merged``: the output in merged-heads order ``[B, N, H D]``.
    """
    per_query = min(keys_max, left + right + 1)
    chunks = -(-per_query // 32)
    names, query_of_set = _local_inputs(sets)
    per_lane = head_dim // 32
    source = f"""
    constexpr int D = {head_dim};
    constexpr int SETS = {sets};
    constexpr int LEFT = {left};
    constexpr int RIGHT = {right};
    constexpr int TILE = {tile};
    constexpr int KMAX = {keys_max};
    constexpr int CHUNKS = {chunks};
    constexpr int PER_LANE = {per_lane};
    constexpr int WARPS = {LOCAL_WARPS};
    constexpr float SCALE = {_float_literal(scale)};
    __shared__ float ks[SETS][KMAX][D + 1];
    __shared__ float vs[KMAX][D + 1];
    __shared__ float ps[WARPS][KMAX];

    const int N = v_shape[2];
    const int tiles = (N + TILE - 1) / TILE;
    const long bh = blockIdx.x / tiles;
    const int q_start = (blockIdx.x % tiles) * TILE;
    const int q_end = min(N, q_start + TILE);
    const int k_start = max(0, q_start - LEFT);
    const int k_end = min(N, q_end + RIGHT);
    const long base = bh * (long)N * D;

    for (int idx = threadIdx.x; idx < (k_end - k_start) * D; idx += blockDim.x) {{
        const int j = idx / D, d = idx % D;
        const long at = base + (long)(k_start + j) * D + d;
        ks[0][j][d] = static_cast<float>(k0[at]);
        {"ks[1][j][d] = static_cast<float>(k1[at]);" if sets == 2 else ""}
        vs[j][d] = static_cast<float>(v[at]);
    }}
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    for (int i = q_start + warp; i < q_end; i += WARPS) {{
        const int lo = max(0, i - LEFT);
        const int count = min(N - 1, i + RIGHT) - lo + 1;
        const int row0 = lo - k_start;
        for (int s = 0; s < SETS; ++s) {{
            // The query in registers (every lane reads the same row: one broadcast load per feature).
            const T* qp = ({query_of_set}) + base + (long)i * D;
            float qr[D];
            #pragma unroll
            for (int d = 0; d < D; ++d) qr[d] = static_cast<float>(qp[d]);
            // A lane per key, all CHUNKS keys of a lane in one pass over the features.
            const float* kr[CHUNKS];
            float score[CHUNKS];
            #pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {{
                kr[c] = ks[s][row0 + min(c * 32 + lane, count - 1)];
                score[c] = 0.0f;
            }}
            #pragma unroll
            for (int d = 0; d < D; ++d) {{
                #pragma unroll
                for (int c = 0; c < CHUNKS; ++c) score[c] += qr[d] * kr[c][d];
            }}
            float top = -INFINITY;
            for (int c = 0; c < CHUNKS; ++c) {{
                score[c] = c * 32 + lane < count ? score[c] * SCALE : -INFINITY;
                top = fmaxf(top, score[c]);
            }}
            for (int o = 16; o > 0; o /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, o));
            float total = 0.0f;
            for (int c = 0; c < CHUNKS; ++c) {{
                score[c] = c * 32 + lane < count ? expf(score[c] - top) : 0.0f;
                total += score[c];
            }}
            for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffff, total, o);
            const float inv = 1.0f / total;
            for (int c = 0; c < CHUNKS; ++c) {{
                const int j = c * 32 + lane;
                if (j < count) ps[warp][j] = s == 0 ? score[c] * inv : ps[warp][j] - score[c] * inv;
            }}
            __syncwarp();
        }}
        for (int p = 0; p < PER_LANE; ++p) {{
            const int d = lane + 32 * p;
            float acc = 0.0f;
            for (int j = 0; j < count; ++j) acc += ps[warp][j] * vs[row0 + j][d];
            out[{_output_row(merged, "i")} + d] = static_cast<T>(acc);
        }}
        __syncwarp();
    }}
"""
    tag = f"d{head_dim}_s{sets}_l{left}_r{right}_t{tile}_k{keys_max}_sc{int(round(scale * 1e6))}{'_m' if merged else ''}"
    return f"sa3_local_attention_{tag}", names, ["out"], source


def _local_inputs(sets: int) -> tuple[list[str], str]:
    """A local-attention kernel's input names (queries, keys, values) and the expression picking set ``s``'s
    queries."""
    names = [f"q{s}" for s in range(sets)] + [f"k{s}" for s in range(sets)] + ["v"]
    return names, " : ".join([f"s == {s} ? q{s}" for s in range(sets - 1)] + [f"q{sets - 1}"])


def _output_row(merged: bool, query: str) -> str:
    """The kernel expression of the offset of ``query``'s output row of head ``bh`` (``base`` = its input
    offset): ``[B, H, N, D]`` like the inputs, or merged heads ``[B, N, H D]``."""
    if not merged:
        return f"base + (long){query} * D"
    return f"((bh / v_shape[1]) * (long)N + {query}) * v_shape[1] * D + (bh % v_shape[1]) * D"


def _banded_shared_bytes(head_dim: int, sets: int, warps: int, span: int) -> int:
    """Shared memory of one tensor-core block: the key rows of its ``warps`` x 16 queries for every set and
    the values, 16-bit, each row padded by 8 values (16-byte aligned, no bank conflicts for ldmatrix)."""
    return 2 * (16 * (warps - 1) + span) * (head_dim + 8) * (sets + 1)


def _banded_mma_plan(queries, keys, values, window, group) -> tuple[int, int, int, int] | None:
    """``(left, right, warps, span)`` for the tensor-core kernel (tokens a query sees on each side, warps of 16
    queries per block, the keys one warp's queries see together, a multiple of 16), or None where it does
    not apply: only half precision (fp32 keeps the SIMT kernel's exact products), only a window."""
    if window is None or not _local_heads_apply(queries, keys, values, (mx.float16, mx.bfloat16)):
        return None
    D = values.shape[3]
    left, right = window[0] * group, window[1] * group
    if left < 0 or right < 0:
        return None
    span = -(-(16 + left + right) // 16) * 16
    if span > BANDED_MAX_SPAN:
        return None
    for warps in (4, 2, 1):
        if _banded_shared_bytes(D, len(queries), warps, span) <= LOCAL_SHARED_BYTES:
            return left, right, warps, span
    return None


def banded_mma_source(head_dim: int, sets: int, left: int, right: int, warps: int, span: int, scale: float,
                      bf16: bool, merged: bool = False) -> tuple[str, list[str], list[str], str]:
    """``(name, input names, output names, body)`` of the tensor-core local-attention kernel.

    A block copies the keys (every set) and values its ``warps * 16`` queries see into shared memory as they
    are (16-bit, 16 bytes per thread and load). Each warp takes 16 queries, FlashAttention-style: the scores
    against the ``span`` keys around them by ``mma.sync`` m16n8k16 (fp32 sums, keys read by ``ldmatrix``),
    the window mask and a softmax per row in registers (a row lives in four lanes), the second set's
    weights subtracted from the first's in fp32, the difference rounded once to 16 bits as the A operand
    of the product with the values (``ldmatrix.trans``), fp32 sums, one rounding at the end. ``merged``: the
    output in merged-heads order ``[B, N, H D]``.
    """
    D, rows = head_dim, 16 * (warps - 1) + span
    kind = "bf16" if bf16 else "f16"
    names, query_of_set = _local_inputs(sets)
    load_k1 = ("*reinterpret_cast<uint4*>(&ks[1][row * STRIDE + c * 8]) = inside ? "
               "*reinterpret_cast<const uint4*>(k1 + at) : zero;") if sets == 2 else ""
    source = f"""
    constexpr int D = {D};
    constexpr int SETS = {sets};
    constexpr int LEFT = {left};
    constexpr int RIGHT = {right};
    constexpr int WARPS = {warps};
    constexpr int SPAN = {span};        // keys a warp's 16 queries see together (multiple of 16)
    constexpr int ROWS = {rows};        // key rows a block holds
    constexpr int STRIDE = D + 8;       // 16-bit values per shared row
    constexpr int NT = SPAN / 8;        // score tiles of 8 keys
    constexpr int KS = D / 16;          // k-steps of the scores (even: D is a multiple of 32)
    constexpr int DT = D / 8;           // output tiles of 8 features
    constexpr float SCALE = {_float_literal(scale)};
    __shared__ __align__(16) unsigned short ks[SETS][ROWS * STRIDE];
    __shared__ __align__(16) unsigned short vs[ROWS * STRIDE];

    const int N = v_shape[2];
    const int tiles = (N + 16 * WARPS - 1) / (16 * WARPS);
    const long bh = blockIdx.x / tiles;
    const int q_block = (blockIdx.x % tiles) * 16 * WARPS;
    const int k_block = q_block - LEFT;  // the key in shared row 0 (rows outside the sequence hold zeros)
    const long base = bh * (long)N * D;

    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int idx = threadIdx.x; idx < ROWS * (D / 8); idx += blockDim.x) {{
        const int row = idx / (D / 8), c = idx % (D / 8);
        const int key = k_block + row;
        const bool inside = key >= 0 && key < N;
        const long at = base + (long)key * D + c * 8;
        *reinterpret_cast<uint4*>(&ks[0][row * STRIDE + c * 8]) = inside ? *reinterpret_cast<const uint4*>(k0 + at) : zero;
        {load_k1}
        *reinterpret_cast<uint4*>(&vs[row * STRIDE + c * 8]) = inside ? *reinterpret_cast<const uint4*>(v + at) : zero;
    }}
    __syncthreads();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first = q_block + 16 * warp;  // this warp's first query; its keys start at shared row 16 * warp
    if (first >= N) return;
    const int g = lane / 4, t2 = (lane % 4) * 2;  // mma fragment row and column pair
    // c += a b for one m16n8k16 tile (16-bit a and b, fp32 c), the fragments as the PTX ISA lays them out.
    auto mma = [](float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {{
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
                     "{{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }};

    float p[NT][4];  // the attention weights, set 0 minus set 1, in the scores' fragment layout
    for (int s = 0; s < SETS; ++s) {{
        const T* qp = ({query_of_set}) + base;
        uint32_t qa[KS][4];
        #pragma unroll
        for (int kk = 0; kk < KS; ++kk) {{
            #pragma unroll
            for (int i = 0; i < 4; ++i) {{
                const int query = first + g + 8 * (i & 1);
                const int col = kk * 16 + t2 + 8 * (i >> 1);
                qa[kk][i] = query < N ? *reinterpret_cast<const uint32_t*>(qp + (long)query * D + col) : 0u;
            }}
        }}
        float sc[NT][4];
        #pragma unroll
        for (int j = 0; j < NT; ++j) {{
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            #pragma unroll
            for (int kk = 0; kk < KS; kk += 2) {{
                uint32_t b[4];
                const unsigned short* at = &ks[s][(16 * warp + 8 * j + lane % 8) * STRIDE + kk * 16 + 8 * (lane / 8)];
                const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(at));
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%0, %1, %2, %3}}, [%4];"
                             : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
                mma(sc[j], qa[kk], b[0], b[1]);
                mma(sc[j], qa[kk + 1], b[2], b[3]);
            }}
        }}
        #pragma unroll
        for (int h = 0; h < 2; ++h) {{  // the lane's two rows: queries first + g and first + g + 8
            const int query = first + g + 8 * h;
            float top = -INFINITY;
            #pragma unroll
            for (int j = 0; j < NT; ++j) {{
                #pragma unroll
                for (int e = 0; e < 2; ++e) {{
                    const int key = first - LEFT + 8 * j + t2 + e;
                    const bool seen = query < N && key >= query - LEFT && key <= query + RIGHT && key >= 0 && key < N;
                    sc[j][2 * h + e] = seen ? sc[j][2 * h + e] * SCALE : -INFINITY;
                    top = fmaxf(top, sc[j][2 * h + e]);
                }}
            }}
            top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 1));
            top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 2));
            if (top == -INFINITY) top = 0.0f;  // a row past the sequence's end: weights 0, never stored
            float total = 0.0f;
            #pragma unroll
            for (int j = 0; j < NT; ++j) {{
                #pragma unroll
                for (int e = 0; e < 2; ++e) {{
                    sc[j][2 * h + e] = expf(sc[j][2 * h + e] - top);
                    total += sc[j][2 * h + e];
                }}
            }}
            total += __shfl_xor_sync(0xffffffff, total, 1);
            total += __shfl_xor_sync(0xffffffff, total, 2);
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            #pragma unroll
            for (int j = 0; j < NT; ++j) {{
                #pragma unroll
                for (int e = 0; e < 2; ++e) {{
                    const float w = sc[j][2 * h + e] * inv;
                    p[j][2 * h + e] = s == 0 ? w : p[j][2 * h + e] - w;
                }}
            }}
        }}
    }}

    float o[DT][4];
    #pragma unroll
    for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < SPAN / 16; ++kk) {{
        uint32_t a[4];  // the weights of keys 16 kk .. 16 kk + 15: two score tiles are one A fragment
        #pragma unroll
        for (int i = 0; i < 4; ++i) {{
            const float* pair = &p[2 * kk + (i >> 1)][2 * (i & 1)];
            const T lo = static_cast<T>(pair[0]);
            const T hi = static_cast<T>(pair[1]);
            a[i] = (uint32_t)(*reinterpret_cast<const unsigned short*>(&lo))
                 | ((uint32_t)(*reinterpret_cast<const unsigned short*>(&hi)) << 16);
        }}
        #pragma unroll
        for (int jd = 0; jd < DT; jd += 2) {{
            uint32_t b[4];
            const int row = 16 * warp + 16 * kk + lane % 8 + 8 * ((lane / 8) % 2);
            const unsigned short* at = &vs[row * STRIDE + 8 * (jd + lane / 16)];
            const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(at));
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{%0, %1, %2, %3}}, [%4];"
                         : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
            mma(o[jd], a, b[0], b[1]);
            mma(o[jd + 1], a, b[2], b[3]);
        }}
    }}
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
        const int query = first + g + 8 * h;
        if (query >= N) continue;
        T* dst = out + {_output_row(merged, "query")} + t2;
        #pragma unroll
        for (int j = 0; j < DT; ++j) {{
            dst[8 * j] = static_cast<T>(o[j][2 * h]);
            dst[8 * j + 1] = static_cast<T>(o[j][2 * h + 1]);
        }}
    }}
"""
    tag = f"d{D}_s{sets}_l{left}_r{right}_w{warps}_n{span}_sc{int(round(scale * 1e6))}_{kind}{'_m' if merged else ''}"
    return f"sa3_banded_mma_{tag}", names, ["out"], source
