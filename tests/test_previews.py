"""Live previews: what each step predicts (``Pipeline.run(preview_every=N)``), and spectrogram pictures."""

from __future__ import annotations

import base64

import mlx.core as mx
import numpy as np

from sa3_mlx.audio import SAMPLE_RATE, spectrogram
from sa3_mlx.pipeline import Finished, Pipeline, Preview, Step, guidance_of


def test_previews_every_n_steps_decode_the_predicted_clean_latents(bundle):
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    s = pipe.settings("rain", seconds=2, steps=7, seed=4, num_outputs=2)
    events = list(pipe.run(s, preview_every=3))
    previews = [e for e in events if isinstance(e, Preview)]
    assert [(p.done, p.total) for p in previews] == [(3, 7), (6, 7)]  # never after the last step
    order = [(type(e).__name__, getattr(e, "done", None)) for e in events if isinstance(e, (Step, Preview))]
    assert order.index(("Preview", 3)) == order.index(("Step", 3)) + 1
    assert all(p.audio.shape == (2, 2 * SAMPLE_RATE) and np.isfinite(p.audio).all() and p.seconds > 0
               for p in previews)
    final = next(e for e in events if isinstance(e, Finished)).result
    # A preview is what the model predicts from the state after its step (the prediction the next step starts
    # from): after step 6 of 7 that is exactly pingpong's result, whose last step lands on its prediction. The
    # preview decodes the first output alone, the run both together: compared at one batch size, since BLAS may
    # round a product of other row counts differently (seen on an AMD EPYC: 1.6e-7).
    alone = pipe.decode_latents(final.latents[0])[:, : final.audio.shape[-1]]
    np.testing.assert_array_equal(previews[-1].audio, alone)
    assert not np.array_equal(previews[0].audio, final.audio[0])
    # Previews change nothing: the same run without them gives the same audio.
    np.testing.assert_array_equal(pipe.generate(settings=s).audio, final.audio)


def test_the_tracked_prediction_of_the_last_pingpong_step_is_the_result(bundle):
    """pingpong's last step lands on its own prediction (sigma 0): the tracked x0 is the final state."""
    pipe = Pipeline("sm-music", weights_dir=bundle, progress=False)
    s = pipe.resolve(pipe.settings("rain", seconds=1.5, steps=4, seed=2))
    plan = pipe.plan(s)
    guidance = guidance_of(s)
    cross, global_cond, uncond = pipe.conditioning("rain", None, 1.5, guidance)
    noise, step_noise = pipe.draw_noise([2], plan.latents)
    denoiser = pipe.denoiser
    last = None
    for last in denoiser.steps(noise, mx.array(plan.sigmas, mx.float32), cross, global_cond, uncond, guidance,
                               step_noise, sampler=s.sampler):
        pass
    np.testing.assert_allclose(np.array(denoiser.denoised), np.array(last), atol=1e-6)


def test_spectrogram_picture():
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    tone = np.stack([0.5 * np.sin(2 * np.pi * 1000 * t)] * 2).astype(np.float32)
    spec = spectrogram(tone)
    assert (spec["width"], spec["height"]) == (160, 48)
    cells = np.frombuffer(base64.b64decode(spec["data"]), np.uint8).reshape(48, 160)
    edges = np.geomspace(40, 16000, 49)
    band = int(np.searchsorted(edges, 1000)) - 1
    assert cells.max() == 255 and (np.argmax(cells, axis=0) == band).all()  # rows from the lowest band up
    quiet = np.frombuffer(base64.b64decode(spectrogram(np.zeros((2, 100), np.float32))["data"]), np.uint8)
    assert quiet.size == 48 * 160
