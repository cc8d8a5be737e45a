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
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from . import DyTParams, Kernels, NormParams, RMSNormParams

MAX_HEAD_DIM = 256
WARPS_PER_BLOCK = 4  # rows (one per warp) per thread block

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
        kernel = _heads_kernel(kinds, head_dim, num_heads, rope_dims, float(rope_base), dyt, eps, masked)
        rows = B * N * len(kinds) * num_heads
        return kernel(
            inputs=inputs,
            template=[("T", x.dtype)],
            grid=(32 * rows, 1, 1),
            threadgroup=(32 * WARPS_PER_BLOCK, 1, 1),
            output_shapes=[(B, num_heads, N, head_dim)] * len(kinds),
            output_dtypes=[x.dtype] * len(kinds),
        )


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
def _heads_kernel(kinds: str, head_dim: int, num_heads: int, rope_dims: int, rope_base: float, dyt: bool,
                  eps: float | None, masked: bool):
    """The kernel for one configuration (its constants are compiled in, so each has its own name)."""
    name, inputs, outputs, source = heads_source(kinds, head_dim, num_heads, rope_dims, rope_base, dyt, eps, masked)
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source)


def heads_source(kinds: str, head_dim: int, num_heads: int, rope_dims: int, rope_base: float, dyt: bool,
                 eps: float | None, masked: bool) -> tuple[str, list[str], list[str], str]:
    """``(name, input names, output names, body)`` of the heads kernel for one configuration.

    One warp per row of ``head_dim`` features (row order = the projection's: token, set, head), so a
    warp reads and writes 2 * head_dim contiguous bytes; the row goes through shared memory for
    RoPE's pairing of feature i with i + rope_dims / 2.
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

    rope_code = "" if not rope_dims else """
    if (kind != 2) {
        for (int j = 0; j < PER_LANE; ++j) {
            int i = lane + 32 * j;
            if (i < D) rows[warp][i] = v[j];
        }
        __syncwarp();
        constexpr int HALF = ROPE / 2;
        for (int j = 0; j < PER_LANE; ++j) {
            int i = lane + 32 * j;
            if (i < ROPE) {
                int p = i < HALF ? i : i - HALF;
                float inv_freq = exp2f(-(static_cast<float>(p) / static_cast<float>(HALF)) * LOG2_BASE);
                float theta = static_cast<float>(n) * inv_freq;
                float c = cosf(theta), sn = sinf(theta);
                float x1 = rows[warp][p], x2 = rows[warp][p + HALF];
                v[j] = i < HALF ? x1 * c - x2 * sn : x1 * sn + x2 * c;
            }
        }
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
    const long total = (long)x_shape[0] * N * S * H;
    const long r = (long)blockIdx.x * {WARPS_PER_BLOCK} + warp;
    if (r >= total) return;
    const int h = r % H;
    const int s = (r / H) % S;
    const long bn = r / (H * S);
    const long n = bn % N;
    const long b = bn / N;
    const int kind = kind_of_set[s];

    const T* src = x + r * D;
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
"""
    tag = (f"{kinds}_d{head_dim}_h{num_heads}_r{rope_dims}_b{int(rope_base * 1000)}_"
           f"{'dyt' if dyt else 'rms' + format(eps or 0.0, '.0e').replace('-', 'm').replace('+', 'p')}"
           f"{'_m' if masked else ''}")
    return f"sa3_heads_{tag}", names, outputs, source
