"""Checkpoints: the LoRA file in upstream's saved format, and the run state for ``--resume``.

The LoRA file is what upstream ``save_lora_safetensors`` writes: safetensors, every tensor
fp16, keys ``<module>.parametrizations.weight.0.<param>`` relative to the DiT root
(``model.…``) and the conditioner root (``conditioners.…``), header metadata
``{"lora_config": json}`` with ``rank, alpha, adapter_type, dropout, include, exclude``
(upstream readers use these; extra fields, as upstream's own ``baked_norms``, are ignored):
here ``step``, ``epoch`` and ``base_model`` follow them unless ``extra`` is off.

Beside it, what upstream does not keep and an exact resume needs: the fp32 LoRA tensors,
the AdamW moments, the step and the data order / random state (``state.safetensors`` +
``state.json``). Every file is written to a temporary name in the same folder and renamed
over the old one, so a crash leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from .adapters import AdapterConfig

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it to ``path`` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def lora_metadata(config: AdapterConfig, extra: Mapping | None = None) -> dict[str, str]:
    fields = config.config_json()
    if extra:
        fields.update(extra)
    return {"lora_config": json.dumps(fields)}


def save_lora(path: str | Path, params: Mapping[str, mx.array], config: AdapterConfig,
              extra: Mapping | None = None) -> Path:
    """The LoRA file (fp16 tensors, ``lora_config`` metadata), written atomically."""
    from safetensors.numpy import save_file

    tensors = {k: np.asarray(v.astype(mx.float32) if isinstance(v, mx.array) else v, np.float32).astype(np.float16)
               for k, v in params.items()}
    metadata = lora_metadata(config, extra)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_state(run_dir: str | Path, params: Mapping[str, mx.array], optimizer_arrays: Mapping[str, mx.array],
               info: Mapping) -> None:
    """The exact training state: fp32 LoRA tensors, AdamW moments (``opt/<name>.m|v``) and ``info`` (JSON)."""
    from safetensors.numpy import save_file

    run_dir = Path(run_dir)
    arrays = {"lora/" + k: np.asarray(v, np.float32) for k, v in params.items()}
    arrays.update({"opt/" + k: np.asarray(v, np.float32) for k, v in optimizer_arrays.items()})
    atomic_write(run_dir / STATE_TENSORS, lambda tmp: save_file(arrays, str(tmp)))
    text = json.dumps(dict(info), indent=1)
    atomic_write(run_dir / STATE_JSON, lambda tmp: tmp.write_text(text))


def load_state(run_dir: str | Path) -> tuple[dict[str, mx.array], dict[str, np.ndarray], dict]:
    """``(params, optimizer arrays, info)`` saved by :func:`save_state`."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    if not (run_dir / STATE_JSON).is_file() or not (run_dir / STATE_TENSORS).is_file():
        raise FileNotFoundError(f"{run_dir}: no training state to resume ({STATE_JSON} / {STATE_TENSORS} missing)")
    info = json.loads((run_dir / STATE_JSON).read_text())
    arrays = load_file(str(run_dir / STATE_TENSORS))
    params = {k[len("lora/"):]: mx.array(v) for k, v in arrays.items() if k.startswith("lora/")}
    opt = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
    return params, opt, info
