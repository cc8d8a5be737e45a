"""Prompt weighting ``(phrase:W)``: the official MLX runner's semantics, refusals, and the unchanged plain prompt."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import settings as table
from sa3_mlx.audio import read_metadata
from sa3_mlx.pipeline import Pipeline
from sa3_mlx.prompt_weights import PromptSyntaxError, parse, token_spans
from sa3_mlx.sampling import Guidance
from sa3_mlx.settings import SettingsError


# ---- the parser: the official runner's cases ----------------------------------------------------


@pytest.mark.parametrize("raw, clean, spans", [
    ("rigid mechanical grid pulse", "rigid mechanical grid pulse", ()),
    ("a (driving rhythmic pulse:2) in the mix", "a driving rhythmic pulse in the mix", ((2, 24, 2.0),)),
    ("(cold synthetic timbre:1.7), sparse texture", "cold synthetic timbre, sparse texture", ((0, 21, 1.7),)),
    ("(rhythm:2) and (silence:0.3) together", "rhythm and silence together", ((0, 6, 2.0), (11, 18, 0.3))),
    ("pulse and (pulse:2) again", "pulse and pulse again", ((10, 15, 2.0),)),
    ("(low end:-1) and (air:0.25)", "low end and air", ((0, 7, -1.0), (12, 15, 0.25))),
    # Literal text: parentheses without a weight, a colon followed by words, escaped parentheses.
    ("a (remix) of it", "a (remix) of it", ()),
    ("(note: quiet) pad", "(note: quiet) pad", ()),
    (r"a \(b:2\) c", "a (b:2) c", ()),
    (r"back\slash (x:1.5)", r"back\slash x", ((11, 12, 1.5),)),
])
def test_parse_like_the_official_runner(raw, clean, spans):
    parsed = parse(raw)
    assert parsed.text == clean and parsed.spans == spans
    for start, end, _ in spans:
        assert "(" not in clean[start:end]


@pytest.mark.parametrize("raw, words", [
    ("(unclosed paren and more", "unbalanced '(' at character 1"),
    ("closing) only", "unbalanced ')' at character 8"),
    ("a (bass:loud)", "the weight 'loud' is not a number"),
    ("a (bass:)", "the weight after ':' is missing"),
    ("a (bass:1.3x)", "the weight '1.3x' is not a number"),
    ("a (bass:11)", "must be in [-10, 10] (got 11)"),
    ("a (:2)", "the phrase is empty"),
    ("a (x (y:2) z)", "nested groups are not supported"),
    ("a ((y:2):3)", "nested groups are not supported"),
    ("a (time:12:30)", "cannot contain ':'"),
    ("un(usual:2) tone", "touches a letter or digit"),
    ("(un:2)usual tone", "touches a letter or digit"),
])
def test_malformed_prompts_are_refused(raw, words):
    with pytest.raises(PromptSyntaxError, match=re.escape(words)):
        parse(raw)


def test_both_front_ends_refuse_with_the_same_words(sa3, work):
    for name in ("prompt", "negative_prompt"):
        field = table.FIELD[name]
        with pytest.raises(SettingsError) as api:
            table.from_request({"prompt": "x", name: "a (bass:loud)"})
        with pytest.raises(SettingsError) as cli:
            table.from_text(field, "a (bass:loud)")
        assert api.value.message(table.api_name) == f"{name} (bass:loud): the weight 'loud' is not a number such as 1.3 or -0.5"
        assert cli.value.message(table.cli_name) == api.value.message(table.api_name).replace(name, field.cli_flag, 1)
    code, out, err = sa3("--prompt", "warm (pad", "--dit", "sm-music")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert lines[0] == "error: --prompt has an unbalanced '(' at character 6 (write \\( for a literal one)"
    assert not (work / "output").exists()


def test_token_spans_by_prefix_counts():
    # A stand-in tokenizer that counts words: the space before a phrase belongs to the phrase.
    count = lambda text: len(text.split())  # noqa: E731
    text = "a warm pad intro"
    assert token_spans(text, ((2, 10, 1.4),), count) == [(1, 3, 1.4)]
    assert token_spans(text, ((2, 10, 1.0),), count) == []  # weight 1: nothing to do


# ---- the encoder and conditioner on the tiny bundle ---------------------------------------------


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline("sm-music", weights_dir=bundle, progress=False)


def test_a_plain_prompt_is_unchanged_bit_for_bit(pipe):
    text = pipe.text
    for prompt in ("rigid mechanical grid pulse", "a (remix) of it", "", "a (warm pad:1) intro"):
        embeds, mask, weights = text.encode_weighted([prompt])
        plain = prompt.replace("(warm pad:1)", "warm pad")
        ids, ref_mask = text.tokenizer.encode([plain], max_length=text.max_length)
        assert weights is None
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))
        np.testing.assert_array_equal(np.asarray(embeds), np.asarray(text.encode([plain])[0]))
        cross, glob, _ = pipe.conditioning(prompt, None, 1.5, Guidance())
        ref_cross, ref_glob, _ = pipe.conditioning(plain, None, 1.5, Guidance())
        np.testing.assert_array_equal(np.asarray(cross), np.asarray(ref_cross))
        np.testing.assert_array_equal(np.asarray(glob), np.asarray(ref_glob))


def test_weights_move_the_phrase_tokens_toward_or_away_from_the_padding_embedding(pipe):
    prompt, clean = "a calm (warm pad:1.5) intro, (noise:0) tail", "a calm warm pad intro, noise tail"
    tokenizer = pipe.text.tokenizer
    embeds, mask, weights = pipe.text.encode_weighted([prompt])
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(pipe.text.encode([clean])[0]))
    # The phrase tokens, by the official prefix construction (<bos> first): "a calm" | " warm pad" | ...
    before = len(tokenizer.processor.Encode("a calm"))
    through = len(tokenizer.processor.Encode("a calm warm pad"))
    n0 = len(tokenizer.processor.Encode("a calm warm pad intro,"))
    n1 = len(tokenizer.processor.Encode("a calm warm pad intro, noise"))
    expected = np.ones(mask.shape, np.float32)
    expected[0, 1 + before:1 + through] = 1.5
    expected[0, 1 + n0:1 + n1] = 0.0
    np.testing.assert_array_equal(np.asarray(weights), expected)

    cross, _, _ = pipe.conditioning(prompt, None, 1.5, Guidance())
    plain, _, _ = pipe.conditioning(clean, None, 1.5, Guidance())
    cross, plain = np.asarray(cross[0, :-1]), np.asarray(plain[0, :-1])
    pad = np.asarray(pipe.conditioner.padding_embedding)
    moved = expected[0] != 1
    np.testing.assert_array_equal(cross[~moved], plain[~moved])  # every other token keeps its bits
    w = expected[0][moved][:, None]
    np.testing.assert_allclose(cross[moved], pad + w * (plain[moved] - pad), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cross[1 + n0:1 + n1], np.broadcast_to(pad, cross[1 + n0:1 + n1].shape), atol=1e-6)


def test_negative_prompt_weights_and_a_run_end_to_end(generate, sa3, work):
    common = ["--dit", "medium", "--cfg", "3", "--seed", "3", "--format", "wav32f"]
    code, out, err = generate("--prompt", "epic (choir:1.8) swell", "--negative-prompt", "(drums:0.5)", *common,
                              "--out", "weighted.wav")
    assert code == 0, err
    assert generate("--prompt", "epic choir swell", "--negative-prompt", "drums", *common, "--out", "plain.wav")[0] == 0
    weighted, _ = sf.read(str(work / "output" / "weighted.wav"))
    plain, _ = sf.read(str(work / "output" / "plain.wav"))
    assert not np.array_equal(weighted, plain)
    meta = read_metadata(work / "output" / "weighted.wav")
    assert (meta["prompt"], meta["negative_prompt"]) == ("epic (choir:1.8) swell", "(drums:0.5)")
    # sa3 info reproduces it with the prompts as typed.
    code, info, _ = sa3("info", work / "output" / "weighted.wav")
    assert code == 0 and "--prompt 'epic (choir:1.8) swell'" in info and "--negative-prompt '(drums:0.5)'" in info


@pytest.mark.parametrize("side, eos, length", [("left", False, 16), ("right", False, 16), ("left", True, 16),
                                               ("right", True, 12)])
def test_weights_land_on_the_phrase_tokens_whatever_the_padding(golden, tmp_path, side, eos, length):
    """A release's tokenizer (transformers' conventions: BOS, maybe EOS, left or right padding, truncation):
    the weights fall on the phrase's own tokens, never on a special token or padding."""
    import json
    import shutil

    from sa3_mlx import upstream
    from sa3_mlx.conditioning import PromptEncoder

    folder = tmp_path / "t5"
    shutil.copytree(golden / "upstream_ckpt" / "t5gemma-b-b-ul2", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": side, "add_eos_token": eos}))
    tokenizer = upstream.HFTokenizer(folder)
    encoder = PromptEncoder(None, tokenizer, length)
    raw = "soft rain, (warm analog pad:2), tape"
    parsed = parse(raw)
    ids, mask = (np.asarray(a) for a in tokenizer.encode([parsed.text], length))
    weights = encoder._token_weights([parsed], mask)[0]
    before, through = tokenizer.count("soft rain,"), tokenizer.count("soft rain, warm analog pad")
    body = tokenizer._pieces(parsed.text)
    kept = mask[0].sum() - 1 - int(eos)  # the prompt's own tokens left after truncation
    phrase = body[before:min(through, kept)]
    weighted = np.nonzero(weights != 1)[0]
    assert list(ids[0][weighted]) == phrase and (weights[weighted] == 2).all() and mask[0][weighted].all()
    real = np.nonzero(mask[0])[0]
    assert real[0] not in weighted and (not eos or real[-1] not in weighted)  # BOS and EOS keep weight 1
    if length == 12:
        assert 0 < len(phrase) < through - before  # a phrase cut by truncation keeps its weight on what is left
