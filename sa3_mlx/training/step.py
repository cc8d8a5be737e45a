"""One training step: conditioning assembly, the DiT with LoRA, the loss and its gradients.

Conventions of upstream ``DiffusionCondTrainingWrapper.training_step`` (see the reference
README, "Conventions found in upstream (training)"):

* cross-attention conditioning = ``[prompt embeddings with the learned padding embedding
  at masked positions (S tokens), seconds token]``; the seconds token is the seconds
  conditioner's Linear (with its LoRA) of the Fourier features of ``clamp(sec) / max``;
  the global conditioning is the same seconds token. The cross-attention mask is ignored.
* CFG dropout zeroes the whole cross-attention row of a dropped item (before
  ``to_cond_embed``), not the global conditioning, nor the local conditioning.
* ``local_add_cond = [inpaint_mask, x0 * inpaint_mask]`` (257 channels; all zeros for FULL_MASK).
* the padding mask zeroes self-attention values of padded latents (``DiT.condition``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..lora import SECONDS_KEY
from ..models.dit import DiTConditioning
from ..models.layers import fourier_features, run_layers
from .adapters import PARAMS, AdaptedLinear, LoraParametrization, StackedAdapters, param_key, unstack
from .fused import FusedBlocks
from .objective import loss_masks, masked_mse, noised_and_target

_LAYERS = "model.transformer.layers."  # upstream's module paths of the DiT blocks
PACKED = "packed."  # the packed layout's names: packed.<stack>.<module kind>.<tensor>


def module_kind(module: str) -> str:
    """``model.transformer.layers.3.self_attn.to_qkv`` -> ``self_attn.to_qkv``."""
    return module[len(_LAYERS):].split(".", 1)[1]


def block_index(module: str) -> int:
    """``model.transformer.layers.3.self_attn.to_qkv`` -> 3."""
    return int(module[len(_LAYERS):].split(".", 1)[0])


# The block modules whose inputs are the same in every block (upstream's names)
_ACROSS_BLOCKS = ("cross_attn.to_kv", "to_local_embed.0", "to_local_embed.2")


def _per_block(y: mx.array) -> list[mx.array]:
    """A stack's outputs [n, B, T, out] -> each block's [B, T, out] (views; the gradient one concatenation)."""
    n, B = y.shape[:2]
    if B == 1:
        return unstack(y.reshape(n, *y.shape[2:]))
    return [part.squeeze(0) for part in unstack(y)]


@dataclass
class Batch:
    """A training batch with every random draw made. Layouts as upstream: latents channels-first."""

    x0: mx.array  # [B, C, T] clean latents
    noise: mx.array  # [B, C, T] (after the OT permutation)
    t: mx.array  # [B] after the distribution shift
    prompt_embeds: mx.array  # [B, S, C_cond] text encoder output
    prompt_mask: mx.array  # [B, S] 1 = token
    seconds: mx.array  # [B] seconds_total
    cfg_keep: mx.array  # [B] 1 = conditioning kept, 0 = dropped
    padding_mask: mx.array  # [B, T] 1 = valid latent (after the silence extension)
    inpaint_mask: mx.array  # [B, T] 1 = provided (context)
    timestep_features: mx.array | None = None  # inject (tests): [B, F]
    seconds_features: mx.array | None = None  # inject (tests): [B, F]


def _leaf(root, key: str) -> tuple[object, str]:
    *path, name = key.split(".")
    node = root
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part] if isinstance(node, dict) else getattr(node, part)
    return node, name


class TrainStep:
    """The loss of a batch as a function of the LoRA tensors, and its gradients.

    ``dit`` and ``conditioner`` hold the frozen base (their adapted weights are set on
    each call); ``mask_loss_weight`` > 0 adds the context loss (train_lora.py: 1).
    """

    compiled = False
    _compiled_grad = None
    _fused = None
    _groups: dict = {}
    _across: dict = {}

    def __init__(self, dit, conditioner, lora: LoraParametrization, mask_loss_weight: float = 0.0,
                 checkpointing: bool = False, fused: bool = False, compiled: bool = False,
                 merged_weights: bool = False):
        self.dit, self.conditioner, self.lora = dit, conditioner, lora
        self.mask_loss_weight = float(mask_loss_weight)
        # fused: the blocks as compiled functions shared by every layer, the backward pass
        # written out block by block (training/fused.py); it recomputes each block in the
        # backward pass, as checkpointing does. Opt-in: on an H200 it took the small model's
        # lora step from 161 to 121-140 ms, gave nothing for dora-rows or the medium model,
        # and its first use on a machine compiles kernels for minutes (docs/performance.md).
        # Gradient checkpointing: each block's activations are recomputed in the backward
        # pass instead of kept (memory of one block instead of all; about one more forward).
        self.fused = bool(fused)
        self._blocks = [nn.utils.checkpoint(layer) for layer in dit.transformer.layers] \
            if checkpointing and not self.fused else None
        # The DiT's targeted Linear / Conv1d modules become factored adapters over their frozen base.
        self._adapted: dict[str, AdaptedLinear] = {}
        config = lora.config
        for t in lora.targets:
            if t.key == SECONDS_KEY:
                continue
            parent, name = _leaf(dit, t.key[: -len(".weight")])
            old = parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
            bias = old["bias"] if "bias" in old else None
            new = AdaptedLinear(t.w0, bias, config.adapter_type, config.scale, t.shape, t.bases)
            if isinstance(parent, list):
                parent[int(name)] = new
            else:
                setattr(parent, name, new)
            new.module_path = t.module  # upstream path: the saved names of its tensors
            self._adapted[t.module] = new
        self._seconds = next((t for t in lora.targets if t.key == SECONDS_KEY), None)
        # merged_weights: each stack forms its layers' adapted weights once per step (one batched product), and
        # each layer then runs one product forward and two backward instead of three and five (on a GPU the
        # step is bound by its number of operations). It keeps the adapted weights and their gradients in
        # memory, and its weight gradients are full-size products: slower where the products are the cost
        # (CPUs; docs/performance.md). Same values up to rounding.
        self.merged_weights = bool(merged_weights) and not self.fused
        self._stacks = [] if self.fused else self._stacked_adapters()
        # The packed layout (what a trainer holds and AdamW updates): each stack's tensors of one name as one
        # [blocks, ...] array, so that a step neither concatenates them nor slices their gradients apart, and
        # AdamW updates a few dozen tensors instead of hundreds. Packed key -> the saved names it holds.
        self._stack_keys = [{p: f"{PACKED}{j}.{module_kind(stack.layers[0].module_path)}.{p}"
                             for p in PARAMS[config.adapter_type]} for j, stack in enumerate(self._stacks)]
        self._groups = {key: [param_key(layer.module_path, p) for layer in stack.layers]
                        for stack, keys in zip(self._stacks, self._stack_keys) for p, key in keys.items()}
        # The modules whose inputs do not depend on the blocks' hidden state (the context's keys and values, the
        # local conditioning's embedding): each kind's outputs for every block as one batched product per factor
        # when one stack holds that module of every block (the default filters).
        self._across = {module_kind(stack.layers[0].module_path): stack for stack in self._stacks
                        if self._runs_across([layer.module_path for layer in stack.layers])}
        self._fused = FusedBlocks(dit.transformer.layers) if self.fused else None
        self._grad = mx.value_and_grad(self._loss)
        # compiled: the whole forward and backward pass traced once per batch shape into one graph, whose
        # element-wise chains run as fused kernels (on an H200 fewer launches per step: the step is bound by
        # them, docs/performance.md). A batch's arrays are its inputs; the frozen weights are constants.
        self.compiled = bool(compiled) and not self.fused
        self._compiled_grad = mx.compile(self._arrays_loss_and_grad) if self.compiled else None

    def _runs_across(self, modules: list[str]) -> bool:
        """Whether a stack of ``modules`` runs for every block at once (:meth:`condition`)."""
        return module_kind(modules[0]) in _ACROSS_BLOCKS and \
            [block_index(m) for m in modules] == list(range(len(self.dit.transformer.layers)))

    def _stacked_adapters(self) -> list[StackedAdapters]:
        """Each module kind's adapters over the blocks, their per-step work batched (same values)."""
        groups: dict[tuple, list] = {}
        for module, layer in self._adapted.items():
            if module.startswith(_LAYERS):
                groups.setdefault((module_kind(module), tuple(layer._w0.shape)), []).append(module)
        stacks = []
        targets = {t.module: t for t in self.lora.targets}
        for modules in groups.values():
            if len(modules) < 2:
                continue
            stacks.append(StackedAdapters([self._adapted[m] for m in modules], merged=self.merged_weights))
            for m in modules:  # the targets' bases are the same views (one copy of the weights)
                targets[m].w0 = self._adapted[m]._w0
                if targets[m].bases is not None:
                    targets[m].bases = self._adapted[m]._bases
        return stacks

    def is_packed(self, params: dict) -> bool:
        """Whether ``params`` is in :meth:`pack`'s layout (always false without stacked adapters)."""
        return bool(self._groups) and next(iter(self._groups)) in params

    def pack(self, params: dict) -> dict:
        """Saved names -> the packed layout (the same values; a no-op without stacked adapters)."""
        members = {k for keys in self._groups.values() for k in keys}
        # concatenate + reshape: one operation where stack makes one per part
        packed = {g: mx.concatenate([params[k] for k in keys], axis=0).reshape(len(keys), *params[keys[0]].shape)
                  for g, keys in self._groups.items()}
        packed.update((k, v) for k, v in params.items() if k not in members)
        return packed

    def _parts(self, packed: dict) -> dict:
        """The packed arrays' parts by their saved names (views)."""
        return {k: part.squeeze(0) for g, keys in self._groups.items()
                for k, part in zip(keys, mx.split(packed[g], len(keys), axis=0))}

    def unpack(self, packed: dict) -> dict:
        """The packed layout -> saved names, in upstream's order (``lora.targets``)."""
        flat = {**{k: v for k, v in packed.items() if k not in self._groups}, **self._parts(packed)}
        order = [param_key(t.module, p) for t in self.lora.targets for p in PARAMS[self.lora.config.adapter_type]]
        return {k: flat[k] for k in order}

    def set_weights(self, params) -> None:
        """The adapter tensors of this step, in either layout (saved names, or :meth:`pack`'s)."""
        kind = self.lora.config.adapter_type
        if self._groups and not self.is_packed(params):
            params = self.pack(params)
        # the stacked layers' own tensors as views (read only by code that asks for a layer's weight)
        params = {**params, **self._parts(params)}
        for module, layer in self._adapted.items():
            layer.adapter = {p: params[param_key(module, p)] for p in PARAMS[kind]}
        for stack, keys in zip(self._stacks, self._stack_keys):
            stack.assign({p: params[key] for p, key in keys.items()})
        if self._seconds is not None:
            t = self._seconds
            mine = {p: params[param_key(t.module, p)] for p in PARAMS[kind]}
            from .adapters import adapted_weight

            w = adapted_weight(kind, self.lora.config.scale, mine, t.w0, t.bases)
            self.conditioner.seconds_total_weight = w.astype(t.w0.dtype).reshape(t.shape)

    def seconds_features(self, seconds: mx.array) -> mx.array:
        c = self.conditioner.config
        s = mx.clip(seconds.astype(mx.float32), c.seconds_min, c.seconds_max)
        return fourier_features((s - c.seconds_min) / (c.seconds_max - c.seconds_min), self.conditioner._freqs)

    def conditioning(self, batch: Batch) -> dict[str, mx.array]:
        cond = self.conditioner
        features = batch.seconds_features if batch.seconds_features is not None else self.seconds_features(batch.seconds)
        w = cond.seconds_total_weight
        seconds_embed = (features.astype(w.dtype) @ w.T + cond.seconds_total_bias.astype(w.dtype))[:, None, :]
        embeds = batch.prompt_embeds.astype(mx.float32)
        padded = cond.pad_prompt(embeds, batch.prompt_mask, "learned")
        cross = mx.concatenate([padded, seconds_embed.astype(padded.dtype)], axis=1)
        used = cross * batch.cfg_keep.astype(cross.dtype)[:, None, None]
        return {"seconds_embed": seconds_embed, "prompt_embeds_padded": padded, "cross_attn_cond": cross,
                "cross_attn_cond_used": used, "global_cond": seconds_embed[:, 0]}

    def inputs(self, batch: Batch) -> dict[str, mx.array]:
        """What the DiT takes besides the conditioning: the local conditioning ``[inpaint_mask, x0 *
        inpaint_mask]`` [B, 1 + C, T], the noised latents, the target and the timestep features."""
        mask = batch.inpaint_mask.astype(mx.float32)
        noised, target = noised_and_target(batch.x0, batch.noise, batch.t)
        features = batch.timestep_features if batch.timestep_features is not None else \
            self.dit.timestep_features(batch.t)
        return {"local_add_cond": mx.concatenate([mask[:, None, :], batch.x0 * mask[:, None, :]], axis=1),
                "noised": noised, "target": target, "timestep_features": features}

    def objective(self, v: mx.array, target: mx.array, batch: Batch) -> dict[str, mx.array]:
        """The signal-only masked MSE, plus the context loss with ``mask_loss_weight``."""
        signal_mask, context_mask = loss_masks(batch.padding_mask.astype(mx.float32),
                                               batch.inpaint_mask.astype(mx.float32))
        signal = masked_mse(v, target, signal_mask)
        loss = signal
        if self.mask_loss_weight > 0:
            loss = loss + self.mask_loss_weight * masked_mse(v, target, context_mask)
        return {"loss_mask": signal_mask, "signal_loss": signal, "loss": loss}

    def condition(self, cross_attn_cond: mx.array, global_cond: mx.array, local_add_cond: mx.array,
                  padding_mask: mx.array) -> DiTConditioning:
        """``DiT.condition`` (without merging repeated tokens), the modules of :data:`_ACROSS_BLOCKS` run for
        every block at once where one stack holds them all (the same values, fewer operations)."""
        across = self._across
        local_embeds = context_projections = None
        if "to_local_embed.0" in across and "to_local_embed.2" in across:
            activation = self.dit.transformer.layers[0].to_local_embed.seq[1]
            local_embeds = lambda x: _per_block(  # noqa: E731
                across["to_local_embed.2"](activation(across["to_local_embed.0"](x))))
        if "cross_attn.to_kv" in across:
            context_projections = lambda context: _per_block(across["cross_attn.to_kv"](context))  # noqa: E731
        return self.dit.condition(cross_attn_cond, global_cond, local_add_cond, padding_mask, merge_repeats=False,
                                  local_embeds=local_embeds, context_projections=context_projections)

    def forward(self, params, batch: Batch) -> dict[str, mx.array]:
        """Every intermediate of the step (the model output ``v`` included), for checking."""
        with kernels.use("mlx"):  # plain MLX ops: the CPU numpy paths are not differentiable
            self.set_weights(params)
            c = self.conditioning(batch)
            x = self.inputs(batch)
            conditioning = self.condition(c["cross_attn_cond_used"], c["global_cond"],
                                          x["local_add_cond"].swapaxes(1, 2), batch.padding_mask)
            v = self.dit.predict(x["noised"], self.dit.embed_timestep(x["timestep_features"]), conditioning,
                                 blocks=self._blocks, queue=False).astype(mx.float32)
            out = self.objective(v, x["target"], batch)
        return {**c, "local_add_cond": x["local_add_cond"], "noised": x["noised"], "target": x["target"], "v": v,
                **out}

    def _loss(self, params, batch: Batch):
        return self.forward(params, batch)["loss"]

    def _arrays_loss_and_grad(self, params, arrays: dict):
        return self._grad(params, Batch(**arrays))

    def loss_and_grad(self, params, batch: Batch):
        """``(loss, grads)`` with the grads in the layout of ``params``: saved names, or :meth:`pack`'s (what a
        trainer steps with: fewer operations)."""
        if self._groups and not self.is_packed(params):
            loss, grads = self.loss_and_grad(self.pack(params), batch)
            return loss, self.unpack(grads)
        with kernels.use("mlx"):
            if self._fused is not None:
                return self._fused_loss_and_grad(params, batch)
            if self._compiled_grad is not None:
                # only the arrays a batch has: a compiled function takes no None (its trace keeps the fields)
                arrays = {f.name: getattr(batch, f.name) for f in fields(batch) if getattr(batch, f.name) is not None}
                return self._compiled_grad(params, arrays)
            return self._grad(params, batch)

    def _fused_loss_and_grad(self, params, batch: Batch):
        """The same loss and gradients, the backward pass written out block by block: the
        part before the blocks (conditioning, embeddings) and the part after (projection,
        loss) through ``mx.vjp``; each block through :class:`FusedBlocks` (compiled, which
        ``mx.compile`` cannot do inside ``mx.value_and_grad``)."""
        dit, fused = self.dit, self._fused
        layer_keys = {param_key(t.module, p) for t in self.lora.targets if t.module.startswith(_LAYERS)
                      for p in PARAMS[self.lora.config.adapter_type]}
        outer = [k for k in params if k not in layer_keys]
        self.set_weights(params)
        trainable = [fused.adapters(i) for i in range(len(fused.blocks))]
        dtype = dit.dtype
        x = self.inputs(batch)
        constant = [x["local_add_cond"].swapaxes(1, 2).astype(dtype)]
        if (value_mask := dit.value_mask(batch.padding_mask)) is not None:
            constant.append(value_mask)

        def before(*values):
            self.set_weights({**params, **dict(zip(outer, values))})
            c = self.conditioning(batch)
            context = run_layers(dit.to_cond_embed, c["cross_attn_cond_used"].astype(dtype))
            global_embed = run_layers(dit.to_global_embed, c["global_cond"].astype(dtype))
            h, adaln = dit.transformer.enter(dit.preprocess(x["noised"]),
                                             global_embed + dit.embed_timestep(x["timestep_features"]))
            return [h, context, adaln]

        def after(h, *values):
            self.set_weights({**params, **dict(zip(outer, values))})
            v = dit.postprocess(dit.transformer.leave(h)).astype(mx.float32)
            return [self.objective(v, x["target"], batch)["loss"]]

        values = [params[k] for k in outer]
        h, context, adaln = before(*values)
        hs = [h]
        for i in range(len(fused.blocks)):
            hs.append(fused.forward(i, trainable[i], hs[-1], context, adaln, constant))
        (loss,), (dh, *outer_grads) = mx.vjp(after, [hs[-1], *values], [mx.array(1.0, mx.float32)])
        dcontext = dadaln = None
        grads = {}
        for i in reversed(range(len(fused.blocks))):
            block_grads, dh, dc, da = fused.backward(i, trainable[i], hs[i], context, adaln, constant, dh)
            dcontext = dc if dcontext is None else dcontext + dc
            dadaln = da if dadaln is None else dadaln + da
            grads.update(zip(fused.names(i), block_grads))
        _, before_grads = mx.vjp(before, values, [dh, dcontext, dadaln])
        self.set_weights(params)
        grads.update((k, a + b) for k, a, b in zip(outer, outer_grads, before_grads))
        return loss, {k: grads[k] for k in params}
