"""Full-size configs and key sets, from the official files' manifests (shapes only, nothing allocated)."""

from __future__ import annotations

import json
from mlx.utils import tree_flatten

from sa3_mlx.conditioning import Conditioner, ConditionerConfig
from sa3_mlx.models.t5gemma import T5GemmaConfig, T5GemmaEncoder, sanitize as t5_sanitize
from tests.util import ManifestWeights


def read(manifests, name):
    return json.loads((manifests / f"{name}.json").read_text())


def test_t5gemma_full_size(manifests):
    data = read(manifests, "t5gemma")
    weights = ManifestWeights(data, "t5gemma_f16.npz", {"META": json.dumps(data["meta_fields"]).encode()})
    config = T5GemmaConfig.from_weights(weights, weights.name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (768, 12, 12, 64)
    assert (config.vocab_size, config.intermediate_size, config.num_key_value_heads) == (256000, 2048, 12)
    model = {k: tuple(v.shape) for k, v in tree_flatten(T5GemmaEncoder(config).parameters())}
    params = t5_sanitize(weights)
    assert model == {k: weights.shape(k) for k in params}
    # What the file holds besides parameters: the config, the tokenizer and the optional RoPE table.
    assert set(data["keys"]) - set(model) == {"META", "TOKENIZER_MODEL", "rope_inv_freq"}
    assert data["keys"]["rope_inv_freq"].get("optional") is True


def test_conditioner_full_size(manifests):
    for name in ("dit_sm-music", "dit_sm-sfx", "dit_medium"):
        keys = read(manifests, name)["keys"]
        cond = {k[len("cond."):]: tuple(v["shape"]) for k, v in keys.items() if k.startswith("cond.")}
        config = ConditionerConfig(*cond["seconds_total_weight"])
        assert (config.cond_dim, config.seconds_features) == (768, 256)
        model = {k: tuple(v.shape) for k, v in tree_flatten(Conditioner(config).parameters())}
        assert model == cond
