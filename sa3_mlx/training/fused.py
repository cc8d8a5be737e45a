"""The DiT's blocks for training as compiled functions that every layer shares (``sa3 train --fused``).

A GPU training step is bound by how many operations the host records, not by the GPU: the
small DiT's dora-rows step is ~45k MLX operations at ~7.5 us each on MLX CUDA, for ~1 ms of
arithmetic (docs/performance.md). ``mx.compile`` fuses operations, but it is bypassed inside
``mx.value_and_grad``, and compiling the whole step traces a 45k-node graph for minutes.

So here one block is traced once and replayed for every layer built alike: the block's
arrays (its frozen base weights, norm constants, -xs bases and adapter tensors) are inputs
of the traced function, not constants, so layer 7 replays the trace of layer 0 with its own
weights. The forward is ``mx.compile``d, and so is its ``mx.vjp`` (which recomputes the
block's forward, as gradient checkpointing does); :meth:`TrainStep._fused_loss_and_grad`
chains them in reverse, outside any gradient transform. Cotangents are computed for the
block's inputs and adapter tensors only, never for the frozen weights. A block here
includes its cross-attention keys / values and its local embedding (which
:meth:`DiT.condition` makes once per generation for sampling).

The values equal the plain step's up to the rounding of fused kernels
(tests/test_training_golden.py runs golden cases fused).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .adapters import PARAMS, AdaptedLinear, param_key

# The frozen arrays an AdaptedLinear keeps privately (None ones are skipped).
_PRIVATE = ("_w0", "_w0t", "_bias", "_rows", "_cols", "_sq")


def _slots(layer: nn.Module) -> tuple[list, list, tuple]:
    """``(frozen, trainable, signature)``: (module, kind, name) of every array the block reads, in a
    fixed order, and what must be equal for two blocks to share a trace (paths, shapes, dtypes)."""
    frozen, trainable, signature = [], [], []
    for path, module in sorted(layer.named_modules(), key=lambda pm: pm[0]):
        if isinstance(module, AdaptedLinear):
            module.prepare()
            mine = [(module, "attr", a) for a in _PRIVATE if getattr(module, a) is not None]
            if module._bases is not None:  # -xs: the SVD bases U, V
                mine += [(module, "basis", 0), (module, "basis", 1)]
            frozen += mine
            trainable += [(module, "adapter", p) for p in PARAMS[module.kind]]
            signature.append((path, module.kind, module._scale))
        else:
            mine = [(module, "item", name) for name, value in sorted(module.items()) if isinstance(value, mx.array)]
            frozen += mine
            signature.append((path, type(module).__name__))
        signature += [(s[1], s[2], tuple(_get(s).shape), str(_get(s).dtype)) for s in mine]
    return frozen, trainable, tuple(signature)


def _get(slot) -> mx.array:
    module, kind, name = slot
    if kind == "basis":
        return module._bases[name]
    return getattr(module, name) if kind == "attr" else module.adapter[name] if kind == "adapter" else module[name]


def _set(slot, value: mx.array) -> None:
    module, kind, name = slot
    if kind == "basis":
        bases = list(module._bases)
        bases[name] = value
        module._bases = tuple(bases)
    elif kind == "attr":
        setattr(module, name, value)
    elif kind == "adapter":
        module.adapter[name] = value
    else:
        module[name] = value


class FusedBlocks:
    """Every block of a DiT as ``(h, context, adaln, local_cond, *value_mask) -> h`` (forward) and
    its vjp, each compiled and traced once per kind of layer. Layers built alike (the same adapters
    on the same modules: all of them, unless an include/exclude filter picks modules of some layers
    only) share one trace.
    """

    def __init__(self, layers: list[nn.Module]):
        shared: dict[tuple, _SharedBlock] = {}
        self.blocks = []
        for layer in layers:
            frozen, trainable, signature = _slots(layer)
            if signature not in shared:
                shared[signature] = _SharedBlock(layer, frozen, trainable)
            self.blocks.append((shared[signature], [_get(s) for s in frozen], trainable))
        self.traces = len(shared)

    def names(self, i: int) -> list[str]:
        """The saved names (:func:`param_key`) of block ``i``'s adapter tensors, in :meth:`adapters` order."""
        return [param_key(s[0].module_path, s[2]) for s in self.blocks[i][2]]

    def adapters(self, i: int) -> list[mx.array]:
        """Block ``i``'s adapter tensors as set now (``TrainStep.set_weights``)."""
        return [_get(s) for s in self.blocks[i][2]]

    def forward(self, i: int, trainable: list, h, context, adaln, constant: list) -> mx.array:
        shared, frozen, _ = self.blocks[i]
        return shared.forward(frozen, trainable, [h, context, adaln], constant)[0]

    def backward(self, i: int, trainable: list, h, context, adaln, constant: list, cotangent: mx.array) -> tuple:
        """``(adapter grads, dh, dcontext, dadaln)`` of block ``i`` (its forward is recomputed)."""
        shared, frozen, _ = self.blocks[i]
        grads = shared.backward(frozen, trainable, [h, context, adaln], constant, [cotangent])
        n = len(trainable)
        return list(grads[:n]), *grads[n:]


class _SharedBlock:
    """One block's function, traced on a template layer with every array an input."""

    def __init__(self, template: nn.Module, frozen_slots: list, trainable_slots: list):
        """``*_slots``: the template's, from :func:`_slots`."""
        self.template = template
        self._frozen_slots, self._trainable_slots = frozen_slots, trainable_slots
        self.forward = mx.compile(self._traced)
        self.backward = mx.compile(self._traced_vjp)

    def _traced(self, frozen: list, trainable: list, inputs: list, constant: list) -> list:
        """The template block run with the given arrays (what is traced); restores the template after."""
        slots = self._frozen_slots + self._trainable_slots
        saved = [_get(s) for s in slots]
        try:
            for s, v in zip(slots, list(frozen) + list(trainable)):
                _set(s, v)
            h, context, adaln = inputs
            local_cond, *value_mask = constant
            layer = self.template
            kv = layer.cross_attn.context_keys_values(context)
            return [layer(h, kv, adaln, layer.to_local_embed(local_cond), *value_mask)]
        finally:
            for s, v in zip(slots, saved):
                _set(s, v)

    def _traced_vjp(self, frozen: list, trainable: list, inputs: list, constant: list, cotangent: list) -> list:
        n = len(trainable)

        def f(*primals):
            return self._traced(frozen, list(primals[:n]), list(primals[n:]), constant)

        _, grads = mx.vjp(f, list(trainable) + list(inputs), cotangent)
        return grads
