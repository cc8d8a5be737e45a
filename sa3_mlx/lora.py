"""LoRA adapters in the upstream saved format, merged into the DiT weights.

An adapter file (``save_lora_safetensors`` upstream) is a safetensors file with fp16
tensors and a ``lora_config`` JSON in its header metadata: ``rank``, ``alpha``,
``adapter_type``, ``include``, ``exclude``. Keys are
``<module>.parametrizations.weight.0.<param>``, the module path relative to the DiT
root (``model.…``) or to the conditioner (``conditioners.…``).

Upstream registers one parametrization per file on every Linear/Conv1d of the DiT
and of the conditioner that passes the file's include/exclude filters, loads the
file's tensors into them, and computes ``W' = p_n(…p_0(W))`` in load order. Here the
same chain is evaluated once, in float64, from the unquantized base weights, and the
result replaces the weight (a merge): exact for a fixed strength, redone whenever a
strength changes (:class:`LoraStack` keeps the base for that).

Per file, with ``scale = alpha / rank``, strength ``s`` and ``W`` the 2-D view
``[out, in * k]`` of what the previous adapters produced:

* ``lora``: ``W + s * scale * B @ A``; ``lora-xs``: the delta is ``U @ M_xs @ V^T`` with
  ``U, V`` the top-``rank`` singular vectors of the *original* weight (signs fixed so the
  largest-magnitude entry of each ``U`` column is positive).
* ``dora-rows`` / ``dora-cols`` (and ``-xs``): ``V = W + s * scale * delta``, normalised per
  row (column), times the magnitude; ``s == 0`` returns ``W`` unchanged (so s -> 0 is
  discontinuous; ``blend_magnitude`` gives the later upstream revision's blend).
* ``bora`` (and ``-xs``): row then column normalisation, each times its magnitude.

A targeted module without tensors in the file keeps the parametrization's initial
values (zero delta, magnitudes = norms of the original weight), as upstream.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from .models.dit import COND_PREFIX
from .settings import lora_interval, lora_options, parse_lora_spec
from .weights import Overlay, WeightError

ADAPTER_TYPES = ("lora", "dora-rows", "dora-cols", "bora", "lora-xs", "dora-rows-xs", "dora-cols-xs", "bora-xs")
PARAMS = {
    "lora": ("lora_A", "lora_B"),
    "dora-rows": ("lora_A", "lora_B", "magnitude"),
    "dora-cols": ("lora_A", "lora_B", "magnitude"),
    "bora": ("lora_A", "lora_B", "magnitude_r", "magnitude_c"),
    "lora-xs": ("M_xs",),
    "dora-rows-xs": ("M_xs", "magnitude"),
    "dora-cols-xs": ("M_xs", "magnitude"),
    "bora-xs": ("M_xs", "magnitude_r", "magnitude_c"),
}
KEY_MARK = ".parametrizations.weight."
# Written by newer trainers next to DoRA tensors: ||W0 + scale * delta||_row of the base the
# adapter was trained on. Not a parameter (upstream loads with strict=False and ignores it);
# the merge recomputes the norm from the actual base.
BAKED_NORM = "baked_vnorm_row"
CKPT_HINT = (
    "pickled .ckpt LoRA files are not read (they can run code when loaded); convert it once with the "
    "upstream package: python -c \"from stable_audio_3.models.lora.utils import convert_lora_ckpt_to_safetensors; "
    "convert_lora_ckpt_to_safetensors('{path}')\""
)

# Upstream DiT / conditioner module path -> official MLX weight key.
DIT_ROOT = "model."
COND_ROOT = "conditioners."
SECONDS_MODULE = "conditioners.seconds_total.embedder.embedding.1"
SECONDS_KEY = COND_PREFIX + "seconds_total_weight"


class LoraError(WeightError):
    """A LoRA file that cannot be read or does not fit the model."""


def module_to_key(module: str) -> str | None:
    """``model.transformer.layers.0.to_local_embed.2`` -> ``transformer.layers.0.to_local_embed.seq.2.weight``."""
    if module == SECONDS_MODULE:
        return SECONDS_KEY
    if not module.startswith(DIT_ROOT):
        return None
    parts = module[len(DIT_ROOT):].split(".")
    if len(parts) > 3 and parts[0] == "transformer" and parts[3] == "to_local_embed":
        parts = parts[:4] + ["seq"] + parts[4:]
    return ".".join(parts) + ".weight"


def key_to_module(key: str) -> str:
    """Inverse of :func:`module_to_key`."""
    if key == SECONDS_KEY:
        return SECONDS_MODULE
    parts = key[: -len(".weight")].split(".")
    if len(parts) > 4 and parts[0] == "transformer" and parts[3] == "to_local_embed" and parts[4] == "seq":
        parts = parts[:4] + parts[5:]
    return DIT_ROOT + ".".join(parts)


def target_keys(weights: Mapping) -> list[str]:
    """Weights upstream would parametrize: every Linear/Conv1d weight (2-D/3-D ``.weight``) and the seconds embedder."""
    keys = [k for k in weights if k.endswith(".weight") and not k.startswith(COND_PREFIX) and len(_shape(weights, k)) >= 2]
    return keys + ([SECONDS_KEY] if SECONDS_KEY in weights else [])


def _shape(weights: Mapping, key: str) -> tuple[int, ...]:
    return tuple(weights.shape(key)) if hasattr(weights, "shape") else tuple(np.shape(weights[key]))


def _expand(pattern: str) -> list[str]:
    """Upstream's bracket expansion: ``layers.[0-2].`` -> ``layers.0.``, ``layers.1.``, ``layers.2.``."""
    pieces = re.split(r"\[(\d+)-(\d+)\]", pattern)
    if len(pieces) == 1:
        return [pattern]
    literals, ranges = pieces[0::3], list(zip(pieces[1::3], pieces[2::3]))
    pools = []
    for a, b in ranges:
        a, b = int(a), int(b)
        step = 1 if b >= a else -1
        pools.append([str(n) for n in range(a, b + step, step)])
    out = []
    for combo in product(*pools):
        text = literals[0]
        for number, literal in zip(combo, literals[1:]):
            text += number + literal
        out.append(text)
    return out


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return bool(patterns) and any(p in name for pattern in patterns for p in _expand(pattern.strip()))


@dataclass
class LoraFile:
    path: Path
    adapter_type: str
    rank: int
    alpha: float
    include: list[str] | None
    exclude: list[str] | None
    tensors: dict[str, dict[str, np.ndarray]]  # module path -> param -> array

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets(self, module: str) -> bool:
        """Whether upstream registers this file's parametrization on ``module``."""
        if self.include is not None and not _matches(module, self.include):
            return False
        return self.exclude is None or not _matches(module, self.exclude)


def read_lora(path: str | Path) -> LoraFile:
    """Parse and check one LoRA file (shapes are checked against the model by :func:`merge`)."""
    path = Path(path).expanduser()
    if path.suffix == ".ckpt":
        raise LoraError(f"{path}: " + CKPT_HINT.format(path=path))
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({e})") from None
    try:
        config = json.loads(metadata.get("lora_config", "{}"))
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: 'lora_config' metadata is not JSON ({e})") from None

    tensors: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for key, value in raw.items():
        module, mark, rest = key.partition(KEY_MARK)
        index, _, param = rest.partition(".")
        if not mark or index != "0" or "." in param:
            bad.append(key)
            continue
        if param == BAKED_NORM:
            continue
        tensors.setdefault(module, {})[param] = value.astype(np.float32)
    if bad:
        raise LoraError(f"{path}: keys not in the '<module>.parametrizations.weight.0.<param>' format: {', '.join(bad[:5])}")
    if not tensors:
        raise LoraError(f"{path}: no LoRA tensors")

    adapter_type = config.get("adapter_type", "lora")
    if adapter_type == "dora":  # legacy name: the variant shows in the magnitude shape, else rows
        adapter_type = "dora-rows"
        for params in tensors.values():
            m = params.get("magnitude")
            if m is not None and m.ndim == 2:
                adapter_type = "dora-cols" if m.shape[0] == 1 else "dora-rows"
                break
    if adapter_type not in ADAPTER_TYPES:
        raise LoraError(f"{path}: adapter_type {adapter_type!r} is not one of {', '.join(ADAPTER_TYPES)}")
    for params in tensors.values():
        for name in ("magnitude", "magnitude_r", "magnitude_c"):
            if name in params and params[name].ndim == 2:
                params[name] = params[name].reshape(-1)
    rank = config.get("rank")
    if rank is None:
        ranks = {p["lora_A"].shape[0] if "lora_A" in p else p["M_xs"].shape[0]
                 for p in tensors.values() if "lora_A" in p or "M_xs" in p}
        if not ranks:
            raise LoraError(f"{path}: cannot infer the rank (no lora_A or M_xs tensors)")
        rank = next(iter(ranks)) if len(ranks) == 1 else None
        if rank is None:
            raise LoraError(f"{path}: tensors have different ranks {sorted(ranks)} and lora_config gives none")
    alpha = float(config.get("alpha", rank))
    return LoraFile(path, adapter_type, int(rank), alpha, config.get("include"), config.get("exclude"), tensors)


def _svd_bases(w0: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` singular vectors ``U [out, r]``, ``V [in, r]`` with upstream's sign convention."""
    u, _, vh = np.linalg.svd(w0, full_matrices=False)
    pick = np.abs(u).argmax(axis=0)
    signs = np.sign(u[pick, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    u, vh = u * signs[None, :], vh * signs[:, None]
    return u[:, :rank], vh[:rank].T


def _blend(magnitude: np.ndarray, base_norm: np.ndarray, strength: float, blend: bool) -> np.ndarray:
    if not blend or strength == 1.0:
        return magnitude
    return base_norm + strength * (magnitude - base_norm)


def _apply(lora: LoraFile, params: dict[str, np.ndarray], w: np.ndarray, w0: np.ndarray, strength: float,
           blend: bool) -> np.ndarray:
    """One parametrization: ``w`` the current 2-D weight, ``w0`` the original (for SVD bases)."""
    kind = lora.adapter_type
    if kind.endswith("-xs"):
        u, v = _svd_bases(w0, lora.rank)
        delta = u @ params["M_xs"] @ v.T
    else:
        delta = params["lora_B"] @ params["lora_A"]
    if kind in ("lora", "lora-xs"):
        return w + lora.scale * strength * delta
    if strength == 0:
        return w
    adapted = w + lora.scale * strength * delta
    if kind.startswith("dora"):
        axis = 1 if kind.startswith("dora-rows") else 0
        norm = np.linalg.norm(adapted, axis=axis, keepdims=True)
        magnitude = np.expand_dims(params["magnitude"], axis)
        return adapted / (norm + 1e-12) * _blend(magnitude, np.linalg.norm(w, axis=axis, keepdims=True), strength, blend)
    rows = adapted / (np.linalg.norm(adapted, axis=1, keepdims=True) + 1e-12)
    rows = _blend(params["magnitude_r"][:, None], np.linalg.norm(w, axis=1, keepdims=True), strength, blend) * rows
    cols = rows / (np.linalg.norm(rows, axis=0, keepdims=True) + 1e-12)
    return cols * _blend(params["magnitude_c"][None, :], np.linalg.norm(w, axis=0, keepdims=True), strength, blend)


def _expected_shapes(lora: LoraFile, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    r = lora.rank
    shapes = {"lora_A": (r, in_dim), "lora_B": (out_dim, r), "M_xs": (r, r), "magnitude_r": (out_dim,), "magnitude_c": (in_dim,)}
    shapes["magnitude"] = (in_dim,) if "cols" in lora.adapter_type else (out_dim,)
    return {p: shapes[p] for p in PARAMS[lora.adapter_type]}


def _initial_params(lora: LoraFile, w0: np.ndarray) -> dict[str, np.ndarray]:
    """A parametrization's values before loading: zero delta, magnitudes = norms of the original weight."""
    out_dim, in_dim = w0.shape
    init = {"lora_A": np.zeros((lora.rank, in_dim)), "lora_B": np.zeros((out_dim, lora.rank)),
            "M_xs": np.zeros((lora.rank, lora.rank)), "magnitude_r": np.linalg.norm(w0, axis=1),
            "magnitude_c": np.linalg.norm(w0, axis=0)}
    init["magnitude"] = init["magnitude_c"] if "cols" in lora.adapter_type else init["magnitude_r"]
    return {p: init[p] for p in PARAMS[lora.adapter_type]}


def check_fits(loras: Sequence[LoraFile], weights: Mapping) -> None:
    """Every file's modules exist in the model (DiT or seconds embedder) with matching shapes."""
    for lora in loras:
        unknown = []
        problems = []
        for module, params in lora.tensors.items():
            key = module_to_key(module)
            if key is None or key not in weights:
                unknown.append(module)
                continue
            shape = _shape(weights, key)
            out_dim, in_dim = shape[0], int(np.prod(shape[1:]))
            expected = _expected_shapes(lora, out_dim, in_dim)
            extra = sorted(set(params) - set(expected))
            missing = sorted(set(expected) - set(params))
            if extra or missing:
                problems.append(f"{module}: {lora.adapter_type} needs {', '.join(expected)}"
                                + (f"; unexpected {', '.join(extra)}" if extra else "")
                                + (f"; missing {', '.join(missing)}" if missing else ""))
                continue
            for param, value in params.items():
                if tuple(value.shape) != expected[param]:
                    problems.append(f"{module}{KEY_MARK}0.{param} has shape {list(value.shape)}, "
                                    f"expected {list(expected[param])} for weight {list(shape)}")
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise LoraError(f"{lora.path}: keys match no module of this model: "
                            + ", ".join(f"{m}{KEY_MARK}0.*" for m in unknown[:5]) + more)
        if problems:
            raise LoraError(f"{lora.path}: tensors do not fit the model: " + "; ".join(problems[:5]))


def skipped(module: str, globs: Sequence[str]) -> bool:
    """Whether a layer filter (patterns matched anywhere in the upstream module path) leaves ``module`` out."""
    return any(fnmatch.fnmatchcase(module, f"*{g}*") for g in globs)


def merge(
    weights: Mapping, loras: Sequence[LoraFile], strengths: Sequence[float], blend_magnitude: bool = False,
    cond_strengths: Sequence[float | None] | None = None, skips: Sequence[Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
    """The weights with the adapters applied in order; only changed tensors are returned (fp32, base layout).

    ``weights`` are the unquantized base weights with official MLX names (``cond.*`` included).
    ``blend_magnitude``: a later upstream revision also moves DoRA/BoRA magnitudes toward
    the base norm for strengths other than 1 (continuous as s -> 0); off by default, as in
    the package the reference adapters were made with (magnitude used as trained).
    ``cond_strengths``: per file, the strength of its conditioner modules (``conditioners.*``; None = its
    strength); ``skips``: per file, module patterns where it is left out (a layer filter).
    """
    if len(loras) != len(strengths):
        raise ValueError("one strength per LoRA file is needed")
    cond_strengths = list(cond_strengths or [None] * len(loras))
    skips = list(skips or [()] * len(loras))
    check_fits(loras, weights)
    merged = {}
    for key in target_keys(weights):
        module = key_to_module(key)
        in_cond = module.startswith(COND_ROOT)
        chain = [(lora, c if in_cond and c is not None else s)
                 for lora, s, c, skip in zip(loras, strengths, cond_strengths, skips)
                 if lora.targets(module) and not skipped(module, skip)]
        # Only files with tensors here change anything, unless a normalising adapter follows one that did.
        if not any(module in lora.tensors for lora, _ in chain):
            continue
        base = np.asarray(weights[key])
        w0 = base.reshape(base.shape[0], -1).astype(np.float64)
        w = w0
        for lora, strength in chain:
            params = lora.tensors.get(module)
            params = _initial_params(lora, w0) if params is None else {k: v.astype(np.float64) for k, v in params.items()}
            w = _apply(lora, params, w, w0, float(strength), blend_magnitude)
        merged[key] = w.reshape(base.shape).astype(np.float32)
    return merged


@dataclass
class LoraStack:
    """LoRA files with their strengths; :meth:`apply` merges them into a copy of the base weights."""

    files: list[LoraFile] = field(default_factory=list)
    strengths: list[float] = field(default_factory=list)
    # Per file, the noise levels (lo, hi) at which it is active; None = always (merged, no cost).
    intervals: list[tuple[float, float] | None] = field(default_factory=list)
    cond_strengths: list[float | None] = field(default_factory=list)  # None: the file's strength
    skips: list[tuple[str, ...]] = field(default_factory=list)  # layer filters: module patterns left out

    def __post_init__(self):
        n = len(self.files)
        self.intervals = list(self.intervals) or [None] * n
        self.cond_strengths = list(self.cond_strengths) or [None] * n
        self.skips = list(self.skips) or [()] * n

    @classmethod
    def from_specs(cls, specs: Sequence[str | tuple]) -> "LoraStack":
        """``"FILE"``, ``"FILE:STRENGTH"``, ``"FILE:STRENGTH@LO-HI"`` or ``(path, strength[, (lo, hi)])``
        entries, in stacking order."""
        stack = cls()
        for spec in specs:
            options: dict = {}
            if isinstance(spec, str):
                path, strength = parse_spec(spec)
                interval = lora_interval(spec)[1]
                try:
                    options = lora_options(spec)[1]
                except ValueError as e:
                    raise LoraError(f"{spec}: {e}") from None
            else:
                path, strength = Path(spec[0]), float(spec[1])
                interval = tuple(spec[2]) if len(spec) > 2 and spec[2] is not None else None
                options = dict(spec[3]) if len(spec) > 3 else {}
            if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
                raise LoraError(f"{path}: the active noise levels {interval[0]:g}-{interval[1]:g} need "
                                "0 <= LO <= HI <= 1")
            stack.files.append(read_lora(path))
            stack.strengths.append(strength)
            stack.intervals.append(None if interval in (None, (0.0, 1.0)) else (float(interval[0]), float(interval[1])))
            stack.cond_strengths.append(None if options.get("cond") is None else float(options["cond"]))
            stack.skips.append(tuple(options.get("skip", ())))
        return stack

    @property
    def gated(self) -> bool:
        """Whether some file is active at some noise levels only (then the DiT switches weights per step)."""
        return any(i is not None for i in self.intervals)

    def active_at(self, level: float) -> frozenset[int]:
        """The files active at noise level ``level``."""
        return frozenset(k for k, i in enumerate(self.intervals) if i is None or i[0] <= level <= i[1])

    def subset(self, active: frozenset[int]) -> "LoraStack":
        """The stack of the ``active`` files alone (always active: what a weight set merges)."""
        keep = [k for k in range(len(self.files)) if k in active]
        return LoraStack([self.files[k] for k in keep], [self.strengths[k] for k in keep], [None] * len(keep),
                         [self.cond_strengths[k] for k in keep], [self.skips[k] for k in keep])

    def specs(self) -> list[str]:
        """``FILE:STRENGTH[@LO-HI][;cond=S][;skip=GLOB|...]`` per file (what the metadata records)."""
        return [f"{f.path}:{s!r}" + ("" if i is None else f"@{i[0]!r}-{i[1]!r}")
                + ("" if c is None else f";cond={c!r}") + ("" if not k else ";skip=" + "|".join(k))
                for f, s, i, c, k in zip(self.files, self.strengths, self.intervals, self.cond_strengths, self.skips)]

    def set_strength(self, strength: float, index: int | None = None) -> None:
        """Strength of every file (``index`` None) or of one, as upstream ``set_lora_strength``."""
        if index is None:
            self.strengths = [float(strength)] * len(self.files)
        else:
            self.strengths[index] = float(strength)

    def apply(self, weights: Mapping) -> Overlay:
        """``weights`` with the merged tensors in place of the stored ones (``.changes``: those); the
        others are read from ``weights`` only when used (a lazy file stays lazy)."""
        changes = {}
        if self.files:
            changes = merge(weights, self.files, self.strengths, cond_strengths=self.cond_strengths,
                            skips=self.skips)
        return Overlay(weights, changes)

    def describe(self) -> list[dict]:
        return [dict(file=str(f.path), type=f.adapter_type, rank=f.rank, alpha=f.alpha, strength=s,
                     active=None if i is None else list(i), cond_strength=c, skip=list(k))
                for f, s, i, c, k in zip(self.files, self.strengths, self.intervals, self.cond_strengths, self.skips)]


def parse_spec(spec: str) -> tuple[Path, float]:
    """``FILE[:STRENGTH]``: the strength is the text after the last colon when it is a number."""
    path, strength = parse_lora_spec(spec)
    return Path(path), strength
