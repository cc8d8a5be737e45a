"""bf16 matrix products on x86 CPUs through oneDNN, for the CPU backend's bf16 DiT.

On the 2-core dev box (AMD EPYC Zen 4: AVX512_BF16) OpenBLAS's fp32 products run at
~190 GFLOP/s, three quarters of a DiT step. oneDNN's bf16 matmul primitive (``vdpbf16ps``,
fp32 accumulation) runs the DiT's shapes at ~400, the fp32 -> bf16 conversion of the
activations included (docs/performance.md has the table). This module is a small ctypes
binding of the parts that needs: an engine and a stream, a matmul primitive per product
shape (``y = x @ W + bias``, x fp32 converted to bf16 by a oneDNN reorder, W bf16, y fp32)
and memory objects over numpy buffers. Nothing is compiled here: the library comes from
the ``onednn-cpu-gomp`` wheel (``<prefix>/lib/libdnnl.so.3``), a dependency on Linux x86-64.

:func:`status` says whether the path can run here (Linux x86-64, a CPU with native bf16
dot products, the library found and its primitive a native bf16 one) and why not; nothing
is loaded on other systems. ``SA3_ONEDNN=0`` turns the path off; ``SA3_ONEDNN_LIB`` names
another ``libdnnl.so.3``.

oneDNN parallelises with GNU OpenMP. Its threads must not spin between products on the
cores numpy's and OpenBLAS's threads are about to use: :func:`sa3_mlx.backend.load_fast_blas`
sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before anything can load libgomp.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import cpu_flags

ENV_VAR = "SA3_ONEDNN"
LIB_ENV_VAR = "SA3_ONEDNN_LIB"
LIBRARY = "libdnnl.so.3"

# oneDNN 3.x C API values (dnnl_types.h).
_F32, _BF16 = 3, 2
_TAG_AB, _TAG_BA = 3, 14
_ENGINE_CPU = 1
_STREAM_IN_ORDER = 1
_QUERY_IMPL_INFO_STR = 8
_ARG_SRC, _ARG_WEIGHTS, _ARG_BIAS, _ARG_DST = 1, 33, 41, 17
_ARG_FROM, _ARG_TO = 1, 17

# Plans (one primitive and its memory objects) kept per weight: one per row count seen
# (the DiT's token count, times the batch); a new clip length adds one.
_PLANS_PER_WEIGHT = 8

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _Arg(ctypes.Structure):
    _fields_ = [("arg", _INT), ("memory", _P)]


class OneDNNError(RuntimeError):
    """A oneDNN call returned a status other than success."""


class _Library:
    """The loaded ``libdnnl.so.3``: typed entry points, one CPU engine and one in-order stream."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)

        def fn(name, *args, res=_INT):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        pp = ctypes.POINTER(_P)
        self.engine_create = fn("dnnl_engine_create", pp, _INT, ctypes.c_size_t)
        self.stream_create = fn("dnnl_stream_create", pp, _P, _INT)
        self.md_create = fn("dnnl_memory_desc_create_with_tag", pp, _INT, ctypes.POINTER(_I64), _INT, _INT)
        self.md_destroy = fn("dnnl_memory_desc_destroy", _P)
        self.matmul_pd = fn("dnnl_matmul_primitive_desc_create", pp, _P, _P, _P, _P, _P, _P)
        self.reorder_pd = fn("dnnl_reorder_primitive_desc_create", pp, _P, _P, _P, _P, _P)
        self.pd_query = fn("dnnl_primitive_desc_query", _P, _INT, _INT, _P)
        self.pd_destroy = fn("dnnl_primitive_desc_destroy", _P)
        self.primitive_create = fn("dnnl_primitive_create", pp, _P)
        self.primitive_destroy = fn("dnnl_primitive_destroy", _P)
        self.execute = fn("dnnl_primitive_execute", _P, _P, _INT, ctypes.POINTER(_Arg))
        self.stream_wait = fn("dnnl_stream_wait", _P)
        self.memory_create = fn("dnnl_memory_create", pp, _P, _P, _P)
        self.memory_set = fn("dnnl_memory_set_data_handle", _P, _P)
        self.memory_destroy = fn("dnnl_memory_destroy", _P)
        self.engine, self.stream = _P(), _P()
        check(self.engine_create(ctypes.byref(self.engine), _ENGINE_CPU, 0), "engine_create")
        check(self.stream_create(ctypes.byref(self.stream), self.engine, _STREAM_IN_ORDER), "stream_create")
        # One product at a time: the memory objects of a plan are rebound on every call, the bf16
        # copy of x lives in one buffer (below), and the library already spreads each product over
        # all the cores.
        self.lock = threading.Lock()
        self._scratch = np.empty(0, np.uint16)

    def scratch(self, elements: int) -> int:
        """The address of a uint16 buffer of at least ``elements``, for the bf16 copy of a product's x:
        one buffer for all products (not one per call), grown to the largest, written and read within
        one call under :attr:`lock`. Kept until the process ends (with ``SA3_REUSE_MEMORY`` glibc kept
        the per-call buffers anyway)."""
        if self._scratch.size < elements:
            self._scratch = np.empty(elements, np.uint16)
        return self._scratch.ctypes.data


def check(status: int, what: str) -> None:
    if status != 0:
        raise OneDNNError(f"oneDNN {what} failed (status {status})")


_lib: _Library | None = None
_status: tuple[bool, str] | None = None
_status_lock = threading.Lock()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has native bf16 dot products (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def library_candidates() -> list[str]:
    """Where ``libdnnl.so.3`` is looked for: ``SA3_ONEDNN_LIB``, else the environment's ``lib/``
    (where the ``onednn-cpu-gomp`` wheel puts it), else the system's loader path."""
    chosen = os.environ.get(LIB_ENV_VAR, "").strip()
    if chosen:
        return [chosen]
    return [os.path.join(sys.prefix, "lib", LIBRARY), os.path.join(sys.base_prefix, "lib", LIBRARY), LIBRARY]


def status() -> tuple[bool, str]:
    """``(usable, why)``: whether bf16 products can run through oneDNN here, decided once per process."""
    global _status, _lib
    with _status_lock:
        if _status is None:
            _status = _probe()
        return _status


def available() -> bool:
    return status()[0]


def _probe() -> tuple[bool, str]:
    global _lib
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return False, f"disabled by {ENV_VAR}=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"needs Linux on x86-64 (this is {sys.platform} {platform.machine()})"
    if not cpu_has_bf16():
        return False, "this CPU has no native bf16 dot products (avx512_bf16 / amx_bf16)"
    errors = []
    for path in library_candidates():
        if os.sep in path and not os.path.isfile(path):
            continue
        try:
            lib = _Library(path)
        except (OSError, AttributeError, OneDNNError) as e:
            errors.append(f"{path}: {e}")
            continue
        impl = _probe_implementation(lib)
        if impl is None:
            return False, f"{path}: no bf16 matmul primitive"
        if "bf16" not in impl and "amx" not in impl:
            return False, f"{path}: oneDNN picked {impl!r}, not a native bf16 kernel"
        _lib = lib
        return True, f"{path} ({impl})"
    if errors:
        return False, "; ".join(errors)
    return False, f"{LIBRARY} not found (pip install onednn-cpu-gomp==2023.2.0)"


def _probe_implementation(lib: _Library) -> str | None:
    """The implementation oneDNN picks for a small product of the kind :class:`BF16Weight` runs."""
    src, wei, dst = (_md(lib, dims, dtype, tag) for dims, dtype, tag in
                     (([64, 256], _BF16, _TAG_AB), ([256, 256], _BF16, _TAG_BA), ([64, 256], _F32, _TAG_AB)))
    pd = _P()
    try:
        if lib.matmul_pd(ctypes.byref(pd), lib.engine, src, wei, None, dst, None) != 0:
            return None
        return _impl_name(lib, pd)
    finally:
        if pd:
            lib.pd_destroy(pd)
        for md in (src, wei, dst):
            lib.md_destroy(md)


def library() -> _Library:
    ok, why = status()
    if not ok:
        raise OneDNNError(f"oneDNN bf16 products are not available: {why}")
    return _lib


def _md(lib: _Library, dims, dtype: int, tag: int) -> _P:
    md = _P()
    check(lib.md_create(ctypes.byref(md), len(dims), (_I64 * len(dims))(*dims), dtype, tag), "memory_desc_create")
    return md


def _impl_name(lib: _Library, pd: _P) -> str:
    name = ctypes.c_char_p()
    check(lib.pd_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name)), "primitive_desc_query")
    return name.value.decode()


class _Handles:
    """oneDNN objects to destroy together (memory descriptors, primitives, memories, descs)."""

    def __init__(self, lib: _Library):
        self.lib = lib
        self.items: list[tuple[str, _P]] = []

    def add(self, kind: str, handle: _P) -> _P:
        self.items.append((kind, handle))
        return handle

    def md(self, dims, dtype: int, tag: int) -> _P:
        return self.add("md", _md(self.lib, dims, dtype, tag))

    def memory(self, md: _P) -> _P:
        mem = _P()
        check(self.lib.memory_create(ctypes.byref(mem), md, self.lib.engine, None), "memory_create")
        return self.add("memory", mem)

    def primitive(self, pd: _P) -> _P:
        prim = _P()
        check(self.lib.primitive_create(ctypes.byref(prim), pd), "primitive_create")
        return self.add("primitive", prim)

    def close(self) -> None:
        destroy = {"md": self.lib.md_destroy, "pd": self.lib.pd_destroy, "primitive": self.lib.primitive_destroy,
                   "memory": self.lib.memory_destroy}
        for kind, handle in reversed(self.items):
            destroy[kind](handle)
        self.items.clear()


class _Plan:
    """The product for one row count ``M``: the reorder of x (fp32) into the library's scratch buffer
    (bf16) and the matmul reading it, their memories, with the weight and bias bound once and the
    argument lists packed once: a call rebinds x, the scratch and y and runs the two primitives."""

    def __init__(self, lib: _Library, m: int, bits: np.ndarray, bias: np.ndarray | None):
        (n, k), self.lib = bits.shape, lib
        self.handles = handles = _Handles(lib)
        try:
            x_md = handles.md([m, k], _F32, _TAG_AB)
            src = handles.md([m, k], _BF16, _TAG_AB)
            weights = handles.md([k, n], _BF16, _TAG_BA)  # W [in, out] stored as W^T [out, in], row-major
            bias_md = handles.md([1, n], _F32, _TAG_AB) if bias is not None else None
            dst = handles.md([m, n], _F32, _TAG_AB)
            pd = _P()
            check(lib.matmul_pd(ctypes.byref(pd), lib.engine, src, weights, bias_md, dst, None), "matmul_pd")
            handles.add("pd", pd)
            self.impl = _impl_name(lib, pd)
            self.primitive = handles.primitive(pd)
            pd = _P()
            check(lib.reorder_pd(ctypes.byref(pd), x_md, lib.engine, src, lib.engine, None), "reorder_pd")
            handles.add("pd", pd)
            self.reorder = handles.primitive(pd)
            self.x, self.src, self.dst = (handles.memory(md) for md in (x_md, src, dst))
            args = [(_ARG_SRC, self.src), (_ARG_WEIGHTS, self._bound(handles, weights, bits)), (_ARG_DST, self.dst)]
            if bias is not None:
                args.append((_ARG_BIAS, self._bound(handles, bias_md, bias)))
            # The reorder writes the bf16 x through the same memory object the matmul reads.
            self.reorder_args = (_Arg * 2)(_Arg(_ARG_FROM, self.x), _Arg(_ARG_TO, self.src))
            self.matmul_args = (_Arg * len(args))(*[_Arg(arg, mem) for arg, mem in args])
            self.elements = m * k
        except BaseException:
            handles.close()
            raise

    def _bound(self, handles: _Handles, md: _P, array: np.ndarray) -> _P:
        mem = handles.memory(md)
        check(self.lib.memory_set(mem, array.ctypes.data), "memory_set_data_handle")
        return mem

    def __call__(self, x: np.ndarray, y: np.ndarray) -> None:
        """``y = bf16(x) @ W^T + bias``; the caller holds the library's lock."""
        lib = self.lib
        check(lib.memory_set(self.x, x.ctypes.data), "memory_set_data_handle")
        check(lib.memory_set(self.src, lib.scratch(self.elements)), "memory_set_data_handle")
        check(lib.memory_set(self.dst, y.ctypes.data), "memory_set_data_handle")
        check(lib.execute(self.reorder, lib.stream, 2, self.reorder_args), "primitive_execute")
        check(lib.execute(self.primitive, lib.stream, len(self.matmul_args), self.matmul_args), "primitive_execute")
        check(lib.stream_wait(lib.stream), "stream_wait")


class BF16Weight:
    """``y = x @ W^T + bias`` with a bf16 weight: x fp32, rounded to bf16 by a oneDNN reorder, products
    summed in fp32, bias added in the product, y fp32.

    ``bits``: the weight ``[out, in]`` as bf16 bit patterns (uint16), row-major (the layout
    ``nn.Linear`` keeps; oneDNN reads it as it is, within a few per cent of its own blocked layout
    on the DiT's shapes). ``bias``: fp32 ``[out]`` or None. Both arrays are read, never copied,
    and must outlive this object (a numpy view of an MLX array keeps that array alive).
    """

    def __init__(self, bits: np.ndarray, bias: np.ndarray | None = None):
        if bits.dtype != np.uint16 or bits.ndim != 2 or not bits.flags.c_contiguous:
            raise ValueError("bits must be a C-contiguous uint16 [out, in] array")
        self.lib = library()
        self.bits = bits
        self.n, self.k = bits.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(1, self.n)
        self._plans: dict[int, _Plan] = {}
        self._finalizer = weakref.finalize(self, _close_plans, self._plans)

    def _plan(self, m: int) -> _Plan:
        plan = self._plans.get(m)
        if plan is None:
            if len(self._plans) >= _PLANS_PER_WEIGHT:
                self._plans.pop(next(iter(self._plans))).handles.close()
            plan = self._plans[m] = _Plan(self.lib, m, self.bits, self.bias)
        return plan

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x @ W^T + bias`` for fp32 ``x [M, in]`` -> fp32 ``[M, out]`` (into ``out`` when given)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        if x.shape != (m, self.k):
            raise ValueError(f"expected x of shape [M, {self.k}], got {list(x.shape)}")
        y = np.empty((m, self.n), np.float32) if out is None else out
        if y.shape != (m, self.n) or y.dtype != np.float32 or not y.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 [{m}, {self.n}] array")
        if m == 0:
            return y
        with self.lib.lock:
            self._plan(m)(x, y)
        return y

    def implementation(self, m: int) -> str:
        """The oneDNN kernel that runs products of ``m`` rows (``brg:avx512_core_bf16`` on the dev box)."""
        with self.lib.lock:
            return self._plan(m).impl


def _close_plans(plans: dict) -> None:
    for plan in plans.values():
        plan.handles.close()
    plans.clear()


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest, ties to even (finite values)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> their fp32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- MLX layers


class BF16Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is bf16 and whose product runs through oneDNN.

    Made in place from an fp32 layer by :func:`use_bf16_products` (same parameters, same
    names; ``weight`` becomes a row-major bf16 ``[out, in]`` array, half the bytes). fp32 input
    that can be evaluated goes to :class:`BF16Weight` (bias added in the product); anything else
    (``mx.compile`` tracing, other dtypes) takes ``nn.Linear``'s MLX product with the same bf16
    weight (fp32 input then unrounded: closer to fp32, not bit-equal to the oneDNN path).
    """

    def __call__(self, x: mx.array) -> mx.array:
        y = self.host_product(x)
        return super().__call__(x) if y is None else mx.array(y)

    def host_product(self, x: mx.array) -> np.ndarray | None:
        """The oneDNN product of fp32 ``x`` as a new numpy array ``[..., out]`` (what ``self(x)`` holds),
        or None where it cannot run (other dtypes, ``mx.compile`` tracing). For a caller that goes on
        in numpy (the CPU backend's GLU): the copy into an MLX array, a pass over cold memory as long
        as the product's output, is skipped."""
        if x.dtype != mx.float32 or x.ndim < 1:
            return None
        try:
            host = np.asarray(x)
        except ValueError:  # inside mx.compile tracing
            return None
        y = self._weight()(host.reshape(-1, host.shape[-1]))
        return y.reshape(*host.shape[:-1], y.shape[-1])

    def _weight(self) -> BF16Weight:
        weight = self.__dict__.get("_bf16")
        if weight is None or weight[0] is not self.weight or weight[1] is not self.get("bias"):
            # First call, or the parameters were replaced (module.update): read them again.
            bias = np.asarray(self["bias"]) if "bias" in self else None
            weight = (self.weight, self.get("bias"), BF16Weight(np.asarray(self.weight.view(mx.uint16)), bias))
            self.__dict__["_bf16"] = weight
        return weight[2]


def use_bf16_products(module: nn.Module) -> int:
    """Turn every fp32 ``nn.Linear`` of ``module`` into a :class:`BF16Linear` (weights rounded to
    bf16, to nearest even, one layer at a time); returns how many. Needs :func:`available`."""
    library()
    count = 0
    for _, layer in module.named_modules():
        if type(layer) is nn.Linear and layer.weight.dtype == mx.float32:
            weight = np.asarray(layer.weight)  # [out, in], any strides (the CPU backend stores W^T row-major)
            bits = np.empty(weight.shape, np.uint16)
            rows = max(1, (1 << 22) // max(1, weight.shape[1]))  # row blocks: temporaries stay small
            for start in range(0, weight.shape[0], rows):
                bits[start : start + rows] = bf16_bits(weight[start : start + rows])
            layer.weight = mx.array(bits).view(mx.bfloat16)
            mx.eval(layer.weight)
            layer.__class__ = BF16Linear
            count += 1
    return count
