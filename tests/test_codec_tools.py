"""``sa3 encode-audio`` and ``sa3 decode-latents``: the codec alone, equal to the pipeline's own encode and decode."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from sa3_mlx import codec
from sa3_mlx.audio import SAMPLE_RATE, read_audio
from sa3_mlx.latents import read_latents
from sa3_mlx.pipeline import Pipeline


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("dit, codec_args", [("sm-music", []), ("medium", ["--decoder", "same-l"]),
                                             ("medium", ["--dit", "medium"])])
def test_round_trip_equals_the_pipelines_own_encode_and_decode(sa3, bundle, work, init_wav, dit, codec_args):
    # 2.3 s of a 22.05 kHz mono OGG: any format and rate, and a length that is no whole latent.
    source = init_wav(2.3, rate=22050, channels=1, name="in.wav")
    data, rate = sf.read(str(source))
    sf.write(str(work / "in.ogg"), data, rate, format="OGG", subtype="VORBIS")
    code, out, err = sa3("encode-audio", work / "in.ogg", "--out", "lat.npy", *codec_args, "--weights-dir", bundle)
    assert code == 0, err
    assert out.strip() == "lat.npy" and "[256, 25] latents of 2.300 s (101430 samples)" in err
    latents = read_latents(work / "lat.npy")
    assert latents.shape == (256, 25) and latents.dtype == np.float32

    pipe = Pipeline(dit, weights_dir=bundle, progress=False)
    audio = read_audio(work / "in.ogg")
    expected = np.array(pipe.encode_init(audio, 25)[0])
    np.testing.assert_array_equal(latents, expected)

    code, out, err = sa3("decode-latents", "lat.npy", "--out", "back.wav", "--format", "wav32f", *codec_args,
                         "--weights-dir", bundle)
    assert code == 0, err
    back, rate = sf.read(str(work / "back.wav"), dtype="float32", always_2d=True)
    decoded = codec.unpatchify(codec.decode(pipe.decoder, mx.array(expected[None]).astype(pipe.codec_dtype)))
    assert rate == SAMPLE_RATE and back.shape == (25 * codec.SAMPLES_PER_LATENT, 2)
    np.testing.assert_array_equal(back.T, np.array(decoded.astype(mx.float32)[0]))

    # --seconds gives the input's length back; the suffix picks the format.
    code, out, err = sa3("decode-latents", "lat.npy", "--out", "back.flac", "--seconds", "2.3", *codec_args,
                         "--weights-dir", bundle)
    assert code == 0, err
    info = sf.info(str(work / "back.flac"))
    assert (info.format, info.frames) == ("FLAC", 101430)


def test_long_input_decodes_in_exact_chunks(sa3, bundle, work, init_wav):
    """A decode longer than one window: the chunked decode, equal to the whole-sequence decoder call."""
    init_wav(12.0, name="long.wav")
    assert sa3("encode-audio", "long.wav", "--out", "long.npy", "--weights-dir", bundle)[0] == 0
    latents = read_latents(work / "long.npy")
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    whole = np.array(codec.unpatchify(pipe.decoder(mx.array(latents[None])))[0])
    chunked = np.array(codec.unpatchify(codec.decode(pipe.decoder, mx.array(latents[None]), max_window=64))[0])
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    np.testing.assert_array_equal(pipe.decode_latents(latents), np.array(
        codec.unpatchify(codec.decode(pipe.decoder, mx.array(latents[None])))[0]))


def test_bad_inputs_are_one_error_line(sa3, bundle, work, init_wav):
    init_wav(1.0, name="in.wav")
    np.save(work / "bad_shape.npy", np.zeros((3, 4), np.float32))
    np.save(work / "nan.npy", np.full((256, 2), np.nan, np.float32))
    np.save(work / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (work / "text.npy").write_text("not an array")
    (work / "exists.npy").write_bytes(b"")
    cases = [
        (["encode-audio", "missing.wav", "--out", "x.npy"], "missing.wav: no such file"),
        (["encode-audio", "text.npy", "--out", "x.npy"], "text.npy: not a readable audio file"),
        (["encode-audio", "in.wav", "--out", "x.wav"], "latents are written as .npy"),
        (["encode-audio", "in.wav", "--out", "exists.npy"], "exists.npy: already exists"),
        (["encode-audio", "in.wav", "--out", "x.npy", "--model", "x", "--decoder", "same-s"], "--model brings its own"),
        (["encode-audio", "in.wav"], "--out"),
        (["decode-latents", "missing.npy", "--out", "x.wav"], "missing.npy: no such file"),
        (["decode-latents", "text.npy", "--out", "x.wav"], "text.npy: not a .npy array file"),
        (["decode-latents", "objects.npy", "--out", "x.wav"], "holds Python objects"),
        (["decode-latents", "bad_shape.npy", "--out", "x.wav"], "latents must be [256, T] with T >= 1 (got shape [3, 4])"),
        (["decode-latents", "nan.npy", "--out", "x.wav"], "contains NaN or infinite values"),
        (["decode-latents", "nan.npy", "--out", "x.m4a"], "--out x.m4a"),
        (["decode-latents", "nan.npy", "--out", "x.wav", "--format", "flac"], "--format flac writes .flac"),
        (["decode-latents", "nan.npy", "--out", "x.wav", "--decoder", "same-xl"], "--decoder"),
    ]
    for args, words in cases:
        code, out, err = sa3(*args, "--weights-dir", bundle)
        assert code == 2 and out == "", (args, err)
        assert words in one_error_line(err), (args, err)
    assert sa3("encode-audio", "in.wav", "--out", "ok.npy", "--weights-dir", bundle)[0] == 0
    code, _, err = sa3("decode-latents", "ok.npy", "--out", "x.wav", "--seconds", "2", "--weights-dir", bundle)
    assert code == 2 and "--seconds 2 must be in (0, 1.02168]" in one_error_line(err)
    assert sorted(p.name for p in work.iterdir()) == ["bad_shape.npy", "exists.npy", "in.wav", "nan.npy",
                                                        "objects.npy", "ok.npy", "text.npy"]


def test_an_input_longer_than_any_model_takes_is_refused_not_cut(sa3, bundle, work):
    sf.write(str(work / "long.flac"), np.zeros(401 * 1000, np.float32), 1000)  # 401 s at 1 kHz: a small file
    code, out, err = sa3("encode-audio", "long.flac", "--out", "long.npy", "--weights-dir", bundle)
    assert code == 2 and out == "" and "long.flac: longer than 400 s" in one_error_line(err)
    assert not (work / "long.npy").exists()
