"""Every adapter type: the factored training layer equals the merged weight, which equals the inference
merge of sa3_mlx.lora (upstream's formulas, checked there against upstream), values and gradients."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import lora as lora_io
from sa3_mlx.training.adapters import ADAPTER_TYPES, PARAMS, AdaptedLinear, adapted_weight, svd_bases

OUT, IN, R, SCALE = 24, 40, 4, 2.0


def _params(kind, w0, rng):
    p = {"lora_A": rng.standard_normal((R, IN)) * 0.1, "lora_B": rng.standard_normal((OUT, R)) * 0.1,
         "M_xs": rng.standard_normal((R, R)) * 0.1, "magnitude_r": np.linalg.norm(w0, axis=1) * 1.1,
         "magnitude_c": np.linalg.norm(w0, axis=0) * 0.9}
    p["magnitude"] = p["magnitude_c"] if "cols" in kind else p["magnitude_r"]
    return {k: p[k].astype(np.float32) for k in PARAMS[kind]}


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_factored_equals_merged_equals_inference_merge(kind):
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((OUT, IN)).astype(np.float32) * 0.2
    bias = rng.standard_normal(OUT).astype(np.float32)
    x = mx.array(rng.standard_normal((2, 7, IN)).astype(np.float32))
    params = _params(kind, w0, rng)
    bases = tuple(mx.array(b) for b in svd_bases(w0, R)) if kind.endswith("-xs") else None
    layer = AdaptedLinear(mx.array(w0), mx.array(bias), kind, SCALE, (OUT, IN), bases)

    def factored(p):
        layer.adapter = p
        return layer(x)

    def merged(p):
        return x @ adapted_weight(kind, SCALE, p, mx.array(w0), bases).T + mx.array(bias)

    p = {k: mx.array(v) for k, v in params.items()}
    y_f, y_m = np.array(factored(p)), np.array(merged(p))
    np.testing.assert_allclose(y_f, y_m, atol=2e-6 * np.abs(y_m).max())

    file = lora_io.LoraFile(None, kind, R, SCALE * R, None, None, {})
    reference = lora_io._apply(file, {k: v.astype(np.float64) for k, v in params.items()}, w0.astype(np.float64),
                               w0.astype(np.float64), 1.0, False)
    np.testing.assert_allclose(np.array(adapted_weight(kind, SCALE, p, mx.array(w0), bases)), reference,
                               atol=2e-6 * np.abs(reference).max())
    assert np.abs(reference - w0).max() > 1e-2, "the adapter changes the weight"

    probe = mx.array(rng.standard_normal(y_m.shape).astype(np.float32))
    g_f = mx.grad(lambda q: mx.sum(factored(q) * probe))(p)
    g_m = mx.grad(lambda q: mx.sum(merged(q) * probe))(p)
    for k in p:
        ref = np.array(g_m[k])
        np.testing.assert_allclose(np.array(g_f[k]), ref, atol=2e-6 * np.abs(ref).max(), err_msg=k)
    np.testing.assert_allclose(np.array(layer.weight), reference, atol=2e-6 * np.abs(reference).max())


class _MergedStep:
    """The reference form of a training step: the adapted weights merged into the modules."""

    def __new__(cls, dit, conditioner, lora):
        from sa3_mlx.lora import SECONDS_KEY
        from sa3_mlx.training.step import TrainStep, _leaf

        class Merged(TrainStep):
            def __init__(self):
                self.dit, self.conditioner, self.lora, self.mask_loss_weight = dit, conditioner, lora, 1.0
                self._blocks, self._fused, self._grad = None, None, mx.value_and_grad(self._loss)

            def set_weights(self, params):
                for key, w in self.lora.weights(params).items():
                    if key == SECONDS_KEY:
                        self.conditioner.seconds_total_weight = w
                    else:
                        node, name = _leaf(self.dit, key)
                        node[name] = w

        return Merged()


@pytest.mark.parametrize("kind", ["dora-rows", "bora", "lora-xs"])
def test_differential_dit_step_equals_the_merged_form(kind):
    """The medium model's differential attention, on a small random DiT: the factored step gives the
    loss and gradients of the weights-merged step (the golden checkpoint has standard attention)."""
    from mlx.utils import tree_flatten

    from sa3_mlx.conditioning import Conditioner, ConditionerConfig
    from sa3_mlx.lora import SECONDS_KEY
    from sa3_mlx.models.dit import DiT, DiTConfig
    from sa3_mlx.training.adapters import AdapterConfig, LoraParametrization
    from sa3_mlx.training.step import Batch, TrainStep

    config = DiTConfig(io_channels=256, embed_dim=64, depth=2, num_heads=2, head_dim=32, cond_token_dim=32,
                       global_cond_dim=32, local_add_cond_dim=257, num_memory_tokens=4, ff_inner=128,
                       timestep_features_dim=256, differential=True)
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(4):
        dit, cond = DiT(config), Conditioner(ConditionerConfig(cond_dim=32, seconds_features=256))
        steps.append((dit, cond))
    weights = dict(tree_flatten(steps[0][0].parameters()))
    weights = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.1) for k, v in weights.items()}
    seconds_w = mx.array(rng.standard_normal((32, 256)).astype(np.float32) * 0.1)
    for dit, cond in steps:
        dit.load_weights(list(weights.items()))
        cond.seconds_total_weight = seconds_w
    lora = LoraParametrization.build({**weights, SECONDS_KEY: seconds_w}, AdapterConfig(kind, 4, 8))
    params = {k: v + (0.05 * mx.array(rng.standard_normal(v.shape).astype(np.float32)) if "magnitude" not in k
                      else 0) for k, v in lora.init_params(1).items()}
    T, S = 12, 6
    batch = Batch(x0=mx.array(rng.standard_normal((2, 256, T)).astype(np.float32)),
                  noise=mx.array(rng.standard_normal((2, 256, T)).astype(np.float32)), t=mx.array([0.3, 0.7]),
                  prompt_embeds=mx.array(rng.standard_normal((2, S, 32)).astype(np.float32)),
                  prompt_mask=mx.array([[1] * 6, [1] * 3 + [0] * 3], dtype=mx.float32),
                  seconds=mx.array([3.0, 2.0]), cfg_keep=mx.array([1.0, 0.0]),
                  padding_mask=mx.array([[1.0] * T, [1.0] * 9 + [0.0] * 3]),
                  inpaint_mask=mx.array([[1.0] * 4 + [0.0] * 8, [0.0] * T]))
    loss_f, grads_f = TrainStep(*steps[0], lora, mask_loss_weight=1.0).loss_and_grad(params, batch)
    loss_m, grads_m = _MergedStep(*steps[1], lora).loss_and_grad(params, batch)
    # --fused (compiled blocks, the backward pass written out), here with a padded item and a value mask
    loss_c, grads_c = TrainStep(*steps[2], lora, mask_loss_weight=1.0, fused=True).loss_and_grad(params, batch)
    # the GPUs' default: the step as one compiled graph
    loss_s, grads_s = TrainStep(*steps[3], lora, mask_loss_weight=1.0, compiled=True).loss_and_grad(params, batch)
    scale = max(float(mx.abs(g).max()) for g in grads_m.values())
    assert scale > 0
    for loss, grads in ((loss_f, grads_f), (loss_c, grads_c), (loss_s, grads_s)):
        assert abs(float(loss) - float(loss_m)) <= 2e-6 * abs(float(loss_m))
        assert set(grads) == set(grads_m)
        for key, g in grads_m.items():
            np.testing.assert_allclose(np.array(grads[key]), np.array(g), atol=2e-6 * scale, err_msg=key)


def test_a_bfloat16_base_in_memory_builds_adapters():
    """Bases held as MLX bfloat16 arrays (what a GPU run with random weights holds) build like fp32 ones:
    numpy has no bfloat16, so they are widened first (the H200 bench failed here)."""
    from sa3_mlx.training.adapters import AdapterConfig, LoraParametrization

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (96, 64)).astype(np.float32)
    weights = {"transformer.layers.0.self_attn.to_qkv.weight": mx.array(w).astype(mx.bfloat16)}
    built = LoraParametrization.build(weights, AdapterConfig("lora", 2), base_dtype=mx.bfloat16)
    reference = LoraParametrization.build({k: np.asarray(v.astype(mx.float32)) for k, v in weights.items()},
                                          AdapterConfig("lora", 2), base_dtype=mx.bfloat16)
    assert [t.key for t in built.targets] == [t.key for t in reference.targets] == list(weights)
    assert mx.array_equal(built.targets[0].w0, reference.targets[0].w0).item()


def test_unstack_is_views_with_one_concatenation_for_the_gradient():
    """The batched adapters' per-module parts: the values of mx.split's parts, the same gradient (zeros for a part
    left unused), and no slice update in the graph of the gradient."""
    import re
    import tempfile

    from sa3_mlx.training.adapters import unstack

    rng = np.random.default_rng(0)
    a, w = mx.array(rng.standard_normal((4, 3, 2)).astype(np.float32)), mx.array(rng.standard_normal((3, 2)))

    def loss(split):
        return lambda a: sum(mx.sum(p * w * (i + 1)) for i, p in enumerate(split(a)[:3]))

    parts = unstack(a)
    assert [p.shape for p in parts] == [(1, 3, 2)] * 4
    for p, q in zip(parts, mx.split(a, 4, axis=0)):
        np.testing.assert_array_equal(np.array(p), np.array(q))
    g = mx.grad(loss(unstack))(a)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:  # the graph, before it is evaluated
        mx.export_to_dot(f.name, g)
        labels = re.findall(r'label ="(\w+)', f.read())
    assert "Concatenate" in labels and "SliceUpdate" not in labels
    np.testing.assert_array_equal(np.array(g), np.array(mx.grad(loss(lambda a: mx.split(a, 4, axis=0)))(a)))
    assert not np.any(np.array(g[3]))
