#!/usr/bin/env bash
# Set up sa3-mlx in ./.venv with the MLX build that fits this machine.
#   ./install.sh          asks before installing
#   ./install.sh -y       no questions (what ./sa3 and scripts/test.sh use)
#   ./install.sh --test   also install the test dependencies (Ray included)
#   ./install.sh --ray    also install Ray, for `sa3 batch --ray` (the sa3-mlx[ray] extra)
# Uses the system Python (>= 3.10); never downloads a Python or a binary installer.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
assume_yes=0
with_test=0
with_ray=0
quiet=0
for arg in "$@"; do
  case "$arg" in
    -y|--yes) assume_yes=1 ;;
    --test) with_test=1 ;;
    --ray) with_ray=1 ;;
    -q|--quiet) quiet=1 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (see ./install.sh --help)" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = 1 ] || echo "$@" >&2; }

# --- which Python ------------------------------------------------------------
python=""
for cand in "${SA3_PYTHON:-}" python3 python3.13 python3.12 python3.11 python3.10 python; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 &&
     "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    python="$(command -v "$cand")"; break
  fi
done
if [ -z "$python" ]; then
  echo "install.sh: Python 3.10 or newer is required (set SA3_PYTHON to its path)" >&2
  exit 2
fi

# --- which MLX build ---------------------------------------------------------
os="$(uname -s)"; arch="$(uname -m)"
mlx_spec=""
case "$os" in
  Darwin)
    if [ "$arch" != "arm64" ]; then
      echo "install.sh: MLX needs Apple Silicon on macOS (this Mac is $arch)" >&2; exit 2
    fi
    mlx_spec="mlx" ;;  # Metal
  Linux)
    driver=""
    if command -v nvidia-smi >/dev/null 2>&1; then
      driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)"
    elif [ -r /proc/driver/nvidia/version ]; then
      driver="$(sed -n 's/.*Kernel Module  *\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n1)"
    fi
    if [ -n "$driver" ] && [ "${SA3_FORCE_CPU:-0}" != 1 ]; then
      major="${driver%%.*}"
      # CUDA 13 wheels need driver >= 580; older drivers get the CUDA 12 build.
      if [ "$major" -ge 580 ] 2>/dev/null; then mlx_spec="mlx[cuda13]"; else mlx_spec="mlx[cuda12]"; fi
    else
      mlx_spec="mlx[cpu]"
    fi ;;
  *) echo "install.sh: unsupported system '$os' (MLX runs on macOS arm64 and Linux)" >&2; exit 2 ;;
esac
[ -n "${SA3_MLX_SPEC:-}" ] && mlx_spec="$SA3_MLX_SPEC"

if [ "$assume_yes" != 1 ] && [ -t 0 ]; then
  printf 'Install sa3-mlx into %s with %s (Python %s)? [Y/n] ' "$venv" "$mlx_spec" "$("$python" -c 'import platform; print(platform.python_version())')"
  read -r answer || answer=n
  case "$answer" in ""|y|Y|yes) ;; *) echo "cancelled"; exit 1 ;; esac
fi

# --- the virtual environment ---------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian/Ubuntu without python3-venv: uv builds the venv from this same Python.
    rm -rf "$venv"
    "$python" -m pip install --quiet --user uv || "$python" -m pip install --quiet --break-system-packages --user uv
    "$python" -m uv venv --python "$python" --python-preference only-system "$venv"
    "$python" -m uv pip install --python "$venv/bin/python" --quiet pip
  fi
fi

pip_quiet=(); [ "$quiet" = 1 ] && pip_quiet=(--quiet)
# Quiet mode also hides the build backend's Python warnings (pip -q does not reach them).
[ "$quiet" = 1 ] && export PYTHONWARNINGS=ignore
wanted=(); [ "$with_test" = 1 ] && wanted+=(test); [ "$with_ray" = 1 ] && wanted+=(ray)
extras=""; [ "${#wanted[@]}" -gt 0 ] && extras="[$(IFS=,; echo "${wanted[*]}")]"
say "installing sa3-mlx with $mlx_spec"
"$venv/bin/python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check "$mlx_spec" -e "$here$extras"

# --- a fast BLAS for the Linux CPU path ------------------------------------------
# The mlx[cpu] wheel bundles the reference BLAS (~6 GFLOP/s); sa3_mlx loads an
# optimized one at import when it finds it (see sa3_mlx/backend.py).
if [ "$os" = Linux ] && [ "${SA3_BLAS:-}" != none ]; then
  if ! "$venv/bin/python" -c 'import sys; from sa3_mlx.backend import candidates; import os; sys.exit(0 if any(os.path.isfile(c) for c in candidates()) else 1)'; then
    sudo=""; [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && sudo="sudo -n"; }
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
      say "installing OpenBLAS (libopenblas0-pthread) for fast CPU matmul"
      $sudo apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ||
        say "warning: apt-get could not install libopenblas0-pthread"
    elif command -v dnf >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
      $sudo dnf install -y -q openblas >/dev/null 2>&1 || say "warning: dnf could not install openblas"
    fi
    if ! "$venv/bin/python" -c 'import sys; from sa3_mlx.backend import candidates; import os; sys.exit(0 if any(os.path.isfile(c) for c in candidates()) else 1)'; then
      if [ "$arch" = x86_64 ]; then
        say "no system OpenBLAS could be installed; installing Intel MKL from PyPI instead (large download)"
        "$venv/bin/python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check mkl ||
          say "warning: no optimized BLAS available; CPU generation will be about 30x slower"
      else
        say "warning: no optimized BLAS available (install your distribution's OpenBLAS package); CPU generation will be slow"
      fi
    fi
  fi
fi

# Load the fast BLAS at every interpreter start of this venv (a .pth file), so it does not depend on
# importing sa3_mlx before mlx (a notebook often imports mlx first).
if [ "$os" = Linux ]; then
  "$venv/bin/python" -m sa3_mlx.preload >/dev/null || say "warning: could not install the BLAS preload"
fi

# Remember what was installed so ./sa3 and scripts/test.sh know when to run this again.
stamp="$("$python" - "$here" "$mlx_spec" "$with_test" "$with_ray" <<'PY'
import hashlib, sys, pathlib
root = pathlib.Path(sys.argv[1])
print(hashlib.sha256((root / "pyproject.toml").read_bytes() + sys.argv[2].encode()).hexdigest()[:16], *sys.argv[3:])
PY
)"
echo "$stamp" > "$venv/.sa3-install-stamp"
say "done: run ./sa3 --help"
