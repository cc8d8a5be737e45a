"""Choosing a fast BLAS for MLX on Linux CPUs, before MLX is imported.

The ``mlx-cpu`` wheel bundles the reference BLAS: fp32 matmul at ~6 GFLOP/s on a
2-core x86 machine, against ~200 with OpenBLAS. MLX resolves ``cblas_sgemm`` through
the process's global symbol scope first, so loading an optimized BLAS with
``RTLD_GLOBAL`` before ``mlx.core`` is imported makes MLX use it: no ``LD_PRELOAD``
needed. ``sa3_mlx/__init__.py`` calls :func:`load_fast_blas` first thing.

``SA3_BLAS=/path/to/libblas.so`` picks a library; ``SA3_BLAS=none`` keeps the bundled one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

# Debian/Ubuntu (libopenblas0-pthread), Fedora/RHEL (openblas), Arch; then MKL from PyPI.
_CANDIDATES = [
    "/usr/lib/{triplet}/openblas-pthread/libblas.so.3",
    "/usr/lib/{triplet}/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "{prefix}/lib/libmkl_rt.so.3",
    "{prefix}/lib/libmkl_rt.so.2",
]

_loaded: str | None = None
_reason = "not attempted"
_memory_reuse = "not attempted"
_warned = False
PRELOAD_FILE = "sa3_mlx_fast_blas.pth"
# One line that site.py runs at every interpreter start of the environment (lines of a .pth that begin
# with "import" are executed): the BLAS is then chosen before a notebook or script imports mlx itself.
PRELOAD_LINE = ("import sys; exec('try:\\n import sa3_mlx.backend as b; b.load_fast_blas()\\n"
                "except Exception:\\n pass')\n")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _triplet() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(), "")


def candidates() -> list[str]:
    return [c.format(triplet=_triplet(), prefix=sys.prefix) for c in _CANDIDATES]


def exact_fp32() -> None:
    """Make fp32 mean fp32 on NVIDIA GPUs: MLX's CUDA backend otherwise runs fp32 matmuls
    as TF32 (10-bit mantissa, ~3e-3 error on the reference cases). The codecs run in
    fp32 because they cancel badly in lower precision; the DiT's speed comes from fp16.
    ``MLX_ENABLE_TF32=1`` restores MLX's default."""
    os.environ.setdefault("MLX_ENABLE_TF32", "0")


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (Linux, glibc).

    MLX's CPU allocator is plain malloc, and glibc serves every block over 32 MB
    with a fresh mmap and unmaps it on free: each large activation then pays the
    kernel's page faults and zeroing again, which made an MLX copy of 50 MB take
    28 ms instead of 4 (measured) and was ~1 s of a 30 s decode on the dev box.
    Serving large blocks from the heap and never trimming it lets them be reused.
    The cost: the process keeps its peak memory until it exits.
    ``SA3_REUSE_MEMORY=0`` leaves glibc's defaults.
    """
    global _memory_reuse
    if sys.platform != "linux" or os.environ.get("SA3_REUSE_MEMORY", "").strip() == "0":
        _memory_reuse = "off" if sys.platform == "linux" else "not needed on this platform"
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _memory_reuse = "not glibc"
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _memory_reuse = "on" if ok else "mallopt failed"
    return ok


def passive_openmp() -> bool:
    """Make GNU OpenMP's idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) on Linux x86-64,
    unless the variable is set already; True when this call set it.

    oneDNN (the CPU backend's bf16 products, :mod:`sa3_mlx.kernels.onednn`) runs on libgomp, whose
    threads otherwise spin after each product on the cores that numpy's workers and OpenBLAS use
    next: alternating oneDNN and OpenBLAS products ran at ~53 GFLOP/s instead of ~200 on the 2-core
    dev box. libgomp reads the variable once, when it loads, so it is set here, before anything can
    load it (``sa3_mlx/__init__.py`` and the preload line).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64" or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def load_fast_blas() -> str | None:
    """Load the first optimized BLAS found (Linux only); returns its path or None.
    Also :func:`passive_openmp`, which must come as early."""
    global _loaded, _reason
    passive_openmp()
    if _loaded is not None or sys.platform != "linux":
        _reason = _reason if sys.platform == "linux" else "not needed on this platform"
        return _loaded
    if "mlx.core" in sys.modules:
        _reason = "mlx was imported before sa3_mlx; import sa3_mlx first to use a fast BLAS"
        _warn_slow_blas()
        return None
    choice = os.environ.get("SA3_BLAS", "").strip()
    if choice.lower() == "none":
        _reason = "disabled by SA3_BLAS=none"
        return None
    # OpenBLAS's idle threads spin for ~2^28 cycles (~0.1 s) after each product, taking
    # a core from the numpy work that follows on the CPU path (an attention right after
    # the QKV product ran 11 ms instead of 7, measured). Sleep at once instead; waking
    # costs microseconds against products of milliseconds.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    for path in [choice] if choice else candidates():
        if path and Path(path).is_file():
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                _reason = f"{path} failed to load: {e}"
                continue
            _loaded = path
            _reason = "loaded"
            return path
    _reason = (
        f"SA3_BLAS={choice} not found" if choice else
        "no optimized BLAS found (install libopenblas0-pthread, or run ./install.sh)"
    )
    return None


def _warn_slow_blas() -> None:
    """Say once, loudly, that matmul on this CPU will be ~30x slower, and how to fix it."""
    global _warned
    if _warned or os.environ.get("SA3_BLAS", "").strip().lower() == "none":
        return
    _warned = True
    mx = sys.modules["mlx.core"]
    try:
        on_cpu = mx.default_device() == mx.cpu
    except Exception:
        on_cpu = True
    if on_cpu and any(Path(c).is_file() for c in candidates()):
        print("sa3_mlx: WARNING: mlx was imported before sa3_mlx, so MLX keeps its bundled reference BLAS and "
              "runs about 30x slower on this CPU. Import sa3_mlx before mlx, or run "
              f"`{Path(sys.executable).name} -m sa3_mlx.preload` once to make the fast BLAS load "
              "at every interpreter start of this environment.", file=sys.stderr)


def install_preload(site_dir: str | None = None) -> Path:
    """Write the ``.pth`` file that loads the fast BLAS at interpreter start (see :data:`PRELOAD_LINE`)."""
    import site
    import sysconfig

    folder = Path(site_dir or sysconfig.get_paths()["purelib"])
    if not folder.is_dir():
        folder = Path(site.getsitepackages()[0])
    path = folder / PRELOAD_FILE
    path.write_text(PRELOAD_LINE)
    return path


def memory_reuse_status() -> str:
    """Whether freed memory is kept for reuse (see :func:`reuse_freed_memory`)."""
    return _memory_reuse


# OpenBLAS core types whose kernels use AVX-512 (its OPENBLAS_CORETYPE names, any case).
OPENBLAS_AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from the first ``flags`` line of ``/proc/cpuinfo`` (or of ``cpuinfo``); empty
    where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def blas_core_note(environ=None, cpuinfo: str | None = None) -> str | None:
    """What an ``OPENBLAS_CORETYPE`` set in the environment costs, when it holds OpenBLAS to AVX2 kernels
    on a CPU with AVX-512: up to half the fp32 product rate (the 2-core AMD EPYC dev box: ~220 against
    ~400 GFLOP/s, sm-music 30 s 18.2 against 12.7 s). sa3_mlx leaves the setting as it is (it is the
    user's, or their cluster's); this is what `sa3 doctor` and the bench report say. None when unset,
    already an AVX-512 type, or the CPU has no AVX-512."""
    environ = os.environ if environ is None else environ
    core = environ.get("OPENBLAS_CORETYPE", "").strip()
    if not core or core.lower() in OPENBLAS_AVX512_CORES or "avx512f" not in cpu_flags(cpuinfo):
        return None
    return (f"OPENBLAS_CORETYPE={core} is set: OpenBLAS runs AVX2 kernels on this AVX-512 CPU (up to half the "
            "fp32 product rate); unset it to let OpenBLAS choose (README, 'Linux CPU')")


def blas_status() -> tuple[str | None, str]:
    """``(path of the BLAS in use or None, why)`` for `sa3 doctor` and the bench header."""
    return _loaded, _reason



def device_name() -> str:
    """What MLX computes on here, in a word: ``gpu`` or ``cpu`` (reports and worker lists)."""
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
