"""`sa3 bench` helpers (the full-size cells themselves are too slow for the suite)."""

from __future__ import annotations

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
