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
