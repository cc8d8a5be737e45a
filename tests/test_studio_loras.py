"""LoRA adapters in the studio: named from the server's --lora-dir (never a path), changed between jobs without
reloading the base model, recorded by name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from sa3_mlx.pipeline import Pipeline
from sa3_mlx.settings import validate
from sa3_mlx.studio.jobs import Studio
from sa3_mlx.studio.settings import BadRequest, Limits, parse_settings
from tests.studio_server import StudioProcess


def write_lora(path: Path, seed: int = 0) -> Path:
    """A rank-2 plain LoRA on the tiny bundle's sm-music DiT (self-attention projections of both blocks)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in (0, 1):
        module = f"model.transformer.layers.{layer}.self_attn.to_qkv.parametrizations.weight.0."
        tensors[module + "lora_A"] = rng.normal(0, 0.3, (2, 64)).astype(np.float16)
        tensors[module + "lora_B"] = rng.normal(0, 0.3, (192, 2)).astype(np.float16)
    save_file(tensors, str(path), metadata={"lora_config": json.dumps({"rank": 2, "alpha": 2, "adapter_type": "lora"})})
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "my_style.safetensors", seed=0)
    write_lora(folder / "other.safetensors", seed=1)
    (folder / "notes.txt").write_text("not an adapter")
    return folder


def test_names_resolve_inside_the_lora_dir_only(tmp_path, lora_dir):
    studio = Studio(tmp_path / "out", limits=Limits(), lora_dir=lora_dir)
    try:
        assert studio.lora_names() == ["my_style", "other"]
        assert studio.lora_paths(("my_style:0.5@0.2-1",)) == (f"{lora_dir / 'my_style.safetensors'}:0.5@0.2-1",)
        for spec, words in (("../my_style", "must start with an adapter's name"),
                            ("my_style/../../x", "must start with an adapter's name"),
                            ("/etc/passwd", "must start with an adapter's name"),
                            ("missing:1", "no adapter named 'missing'"),
                            ("notes", "no adapter named 'notes'")):
            with pytest.raises(BadRequest, match=words):
                studio.lora_paths((spec,))
    finally:
        studio.close()
    bare = Studio(tmp_path / "out2", limits=Limits())
    try:
        with pytest.raises(BadRequest, match="no adapters"):
            bare.submit(parse_settings({"prompt": "x", "loras": ["my_style"]}, Limits()))
    finally:
        bare.close()


def test_adapters_change_between_jobs_without_reloading_the_base(tmp_path, lora_dir, bundle):
    """Only the DiT is rebuilt: the text encoder, the codecs and the stored DiT weights stay."""
    studio = Studio(tmp_path / "out", weights_dir=bundle, limits=Limits(), lora_dir=lora_dir)
    try:
        first = studio._get_pipeline(validate({"prompt": "x", "loras": ("my_style:1.0",)}))
        first.text, first.decoder, first.dit  # loaded once
        text, decoder, base = first._text, first._decoder, first._lora_base
        assert base is not None
        second = studio._get_pipeline(validate({"prompt": "x", "loras": ("my_style:0.3@0.5-1", "other")}))
        assert second is first and second._text is text and second._decoder is decoder
        second.dit
        assert second._lora_base is base  # the stored DiT weights were not read again
        assert len(second.loras.files) == 2 and second.loras.intervals[0] == (0.5, 1.0)
        third = studio._get_pipeline(validate({"prompt": "x"}))
        assert third is first and not third.loras.files
        other_model = studio._get_pipeline(validate({"prompt": "x", "model": "sm-sfx"}))
        assert other_model is not first
    finally:
        studio.close()


def test_a_job_with_adapters_over_the_socket(tmp_path, lora_dir, bundle):
    server = StudioProcess(tmp_path / "out", bundle, "--lora-dir", str(lora_dir))
    try:
        status, options = server.json("GET", "/api/options")
        assert status == 200 and options["loras"] == ["my_style", "other"]
        common = dict(prompt="lofi", seconds=1, steps=2, seed=4, format="wav32f")
        plain = server.wait(server.submit(**common)["id"])
        styled = server.wait(server.submit(**common, loras=["my_style:1.0"])["id"])
        assert plain["status"] == styled["status"] == "done", styled["error"]
        assert styled["settings"]["loras"] == ["my_style:1.0"]
        audio = [sf.read(io.BytesIO(server.request("GET", job["outputs"][0]["url"])[2]), dtype="float32")[0]
                 for job in (plain, styled)]
        assert np.abs(audio[0] - audio[1]).max() > 1e-5  # the adapter changes the sound
        # The same run on the command line's pipeline, with the file: the same audio.
        expected = Pipeline("sm-music", weights_dir=bundle, progress=False,
                            loras=[f"{lora_dir / 'my_style.safetensors'}:1.0"]).generate("lofi", seconds=1, steps=2, seed=4)
        np.testing.assert_allclose(audio[1].T, expected.audio[0], atol=1e-6)
        status, meta = server.json("GET", styled["outputs"][0]["metadata_url"])
        assert meta["metadata"]["loras"] == ["my_style:1.0"] and str(lora_dir) not in json.dumps(meta)
        status, answer = server.json("POST", "/api/jobs", {**common, "loras": ["../../etc/passwd"]})
        assert status == 400 and "must start with an adapter's name" in answer["error"]
        status, answer = server.json("POST", "/api/jobs", {**common, "loras": ["my_style:11"]})
        assert status == 400 and "loras" in answer["error"] and "strength" in answer["error"]
    finally:
        server.stop()
