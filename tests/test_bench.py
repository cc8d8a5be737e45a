"""`sa3 bench` helpers (the full-size cells themselves are too slow for the suite)."""

from __future__ import annotations

import os
import sys

from sa3_mlx import bench
from sa3_mlx.models.t5gemma import Tokenizer
from sa3_mlx.runtime import configure_process
from sa3_mlx.sources.modules import BENCH_PROMPT, bench_tokenizer


def test_random_tokenizer_gives_the_prompt_a_realistic_length():
    """Gemma's vocabulary keeps the prompt's words whole and splits digits: 16 tokens with <bos>."""
    tokenizer = Tokenizer(bench_tokenizer(), pad_id=0)
    _, mask = tokenizer.encode([BENCH_PROMPT], max_length=256)
    assert int(mask.sum()) == 16


def test_hardware_line_and_peak_rss():
    configure_process()  # what `sa3 bench` does first
    info = bench.hardware()
    assert info["mlx"] and info["device"] and info["cpu"]
    if "cpu" in info["device"].lower():
        assert "blas" in info and info["memory reuse"] == ("on" if sys.platform == "linux" else "not needed on this platform")
    assert 10 << 20 < bench._peak_rss() < 1 << 40  # bytes on every platform


def test_training_turns_cuda_graphs_off_on_cuda_only_unless_set(monkeypatch):
    """A training process on CUDA launches kernels directly (MLX_USE_CUDA_GRAPHS=0: 1.8-2.4x faster steps on
    an H200); inference keeps the graphs; a value the user set stands; other devices are left alone."""
    from sa3_mlx import runtime

    var = runtime.CUDA_GRAPHS_VAR
    monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "on_cuda", lambda: True)
    configure_process()
    assert var not in os.environ
    configure_process(training=True)  # after an inference configuration too: it is decided per process
    assert os.environ[var] == "0"
    monkeypatch.setenv(var, "1")
    configure_process(training=True)
    assert os.environ[var] == "1"
    monkeypatch.delenv(var)
    monkeypatch.setattr(runtime, "on_cuda", lambda: False)
    configure_process(training=True)
    assert var not in os.environ


def test_cold_start_runs_sa3_from_a_written_bundle(tmp_path, monkeypatch):
    """`sa3 bench --cold`: the random bundle is written in the official format and a fresh `sa3` process
    generates from it; the figures come from the OS and the CLI's own summary."""
    from sa3_mlx.sources import modules
    from tests.bundle import T5_CONFIG

    tiny_dit = dict(embed_dim=64, depth=2, num_heads=2, ff_inner=128, differential=False, io_channels=256,
                    head_dim=32, cond_token_dim=64, global_cond_dim=64, local_add_cond_dim=257,
                    num_memory_tokens=4, timestep_features_dim=256)
    monkeypatch.setitem(modules.RELEASED_DIT, "sm-music", tiny_dit)
    monkeypatch.setattr(modules, "RELEASED_T5GEMMA", {k: v for k, v in T5_CONFIG.items()
                                                      if k not in ("rope_theta", "rms_norm_eps", "pad_token_id")})
    monkeypatch.setitem(modules.RELEASED_SAME, "same-s", dict(family="s", dim=64, num_heads=2, head_dim=32,
                                                              num_blocks=2, ff_inner=128))
    folder = modules.write_random_bundle(tmp_path / "bundle", ("sm-music",))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["t5gemma_f16.npz", "dit_sm-music_f16.npz", "same_s_encoder_f32.npz", "same_s_decoder_f32.npz"])
    result = bench.run_cold("sm-music", 1.0, 1, str(folder))
    assert result["cold_wall_s"] > result["load_s"] > 0 and 10 << 20 < result["peak_rss_bytes"] < 1 << 40
    assert set(result["stages"]) >= {"load text encoder", "load DiT", "sampling", "decoding"}


def test_train_compile_modes(monkeypatch):
    """`sa3 bench --train --compiled LIST`: each word its (fused blocks, compiled AdamW, compiled step); `auto` leaves
    the last two to the device; a bad word is one line naming the choices. The device default compiles the step
    on GPUs only, and SA3_COMPILE overrides it."""
    import pytest

    from sa3_mlx import runtime
    from sa3_mlx.arguments import UsageError

    assert bench.compile_modes("step, adamw,off") == [(False, True, True), (False, True, False), (False, False, False)]
    assert bench.compile_modes("auto,fused") == [(False, None, None), (True, True, False)]
    with pytest.raises(UsageError, match=r"--compiled 'step,quick': a comma-separated list of auto, step, fused"):
        bench.compile_modes("step,quick")
    monkeypatch.setenv("SA3_COMPILE", "1")
    assert runtime.compile_training_step_by_default()
    monkeypatch.setenv("SA3_COMPILE", "0")
    assert not runtime.compile_training_step_by_default()


def test_train_merged_weight_modes(monkeypatch):
    """`sa3 bench --train --merged-weights LIST`: auto leaves it to the device (on where the step is compiled, never
    with gradient checkpointing); a bad word is one line naming the choices."""
    import pytest

    from sa3_mlx import runtime
    from sa3_mlx.arguments import UsageError

    assert bench.merged_weight_modes("on, off,auto") == [True, False, None]
    with pytest.raises(UsageError, match=r"--merged-weights 'on,maybe': a comma-separated list of auto, on, off"):
        bench.merged_weight_modes("on,maybe")
    monkeypatch.setenv("SA3_COMPILE", "1")
    assert runtime.merge_adapted_weights_by_default() and not runtime.merge_adapted_weights_by_default(True)
    assert runtime.training_step_modes(None, None) == {"compiled": True, "merged_weights": True}
    assert runtime.training_step_modes(None, None, checkpointing=True) == {"compiled": True, "merged_weights": False}
    monkeypatch.setenv("SA3_COMPILE", "0")
    assert not runtime.merge_adapted_weights_by_default()
    assert runtime.training_step_modes(None, None) == {"compiled": False, "merged_weights": False}
    assert runtime.training_step_modes(True, True, checkpointing=True) == {"compiled": True, "merged_weights": True}
