"""AdamW with the semantics of ``torch.optim.AdamW`` (what upstream's trainer uses).

Per element, at step ``k`` (1-based): ``p <- p (1 - lr wd)``; ``m <- b1 m + (1 - b1) g``;
``v <- b2 v + (1 - b2) g^2``; ``p <- p - (lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps)``.
MLX's ``optimizers.AdamW`` defaults differ (``weight_decay=0.01``, ``bias_correction=False``),
so the update is written out here; its state is plain arrays (saved for ``--resume``).
Optional: gradient clipping by the global norm, linear warm-up of the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

# train_lora.py's optimizer settings.
DEFAULTS = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}


@dataclass
class AdamW:
    lr: float = DEFAULTS["lr"]
    betas: tuple[float, float] = DEFAULTS["betas"]
    eps: float = DEFAULTS["eps"]
    weight_decay: float = DEFAULTS["weight_decay"]
    warmup_steps: int = 0
    clip_norm: float | None = None
    step: int = 0
    state: dict = field(default_factory=dict)  # flat name -> (m, v)
    # One mx.compile'd update of every tensor (a few hundred fused kernels instead of ~26
    # operations per tensor: a large part of a GPU step's host time); same values.
    compiled: bool = False
    _compiled_update: Callable | None = field(default=None, init=False, repr=False)

    def lr_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr

    def update(self, params: dict, grads: dict) -> tuple[dict, float]:
        """New params after one step and the gradient norm (before clipping); flat dicts name -> array."""
        self.step += 1
        k = self.step
        lr = self.lr_at(k)
        b1, b2 = self.betas
        for name, p in params.items():
            if name not in self.state:
                self.state[name] = (mx.zeros_like(p), mx.zeros_like(p))
        state = {n: self.state[n] for n in params}
        # Per-step numbers as arrays: a compiled update is traced once, not once per learning rate.
        numbers = mx.array([1 - lr * self.weight_decay, lr / (1 - b1**k), math.sqrt(1 - b2**k)], mx.float32)
        run = self._update
        if self.compiled:
            if self._compiled_update is None:
                self._compiled_update = mx.compile(self._update)
            run = self._compiled_update
        out, state, norm = run(params, grads, state, numbers)
        self.state.update(state)
        return out, norm

    def _update(self, params: dict, grads: dict, state: dict, numbers: mx.array):
        b1, b2 = self.betas
        decay, c1, c2 = numbers[0], numbers[1], numbers[2]
        norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
        if self.clip_norm is not None:
            factor = mx.minimum(1.0, self.clip_norm / (norm + 1e-6))
            grads = {n: g * factor for n, g in grads.items()}
        out, new_state = {}, {}
        for name, p in params.items():
            g = grads[name]
            m, v = state[name]
            p = p * decay
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * mx.square(g)
            p = p - c1 * m / (mx.sqrt(v) / c2 + self.eps)
            new_state[name] = (m, v)
            out[name] = p
        return out, new_state, norm

    def arrays(self) -> dict[str, mx.array]:
        """The state as flat arrays (``<name>.m``, ``<name>.v``)."""
        out = {}
        for name, (m, v) in self.state.items():
            out[name + ".m"], out[name + ".v"] = m, v
        return out

    def load_arrays(self, arrays: dict, step: int) -> None:
        names = {k[:-2] for k in arrays if k.endswith((".m", ".v"))}
        self.state = {n: (mx.array(arrays[n + ".m"]), mx.array(arrays[n + ".v"])) for n in names}
        self.step = int(step)

    def config(self) -> dict:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "warmup_steps": self.warmup_steps, "clip_norm": self.clip_norm}

