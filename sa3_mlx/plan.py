"""What a run will do, worked out from the settings and the model source before anything is loaded:
the mode, the latent length (with upstream's headroom rule), the regions to regenerate, the noise
schedule, warnings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .codec import PATCH_SIZE, SAMPLES_PER_LATENT
from .sampling import build_schedule
from .settings import MIN_NOISE_LEVEL, SettingsError, shift_options
from .sources import CodecLayout

MODES = ("text-to-audio", "audio-to-audio", "inpainting", "continuation")


def latent_length(seconds: float, codec_name: str) -> int:
    """Latents sampled for ``seconds`` of audio: ceil(seconds * 44100 / 4096), even for SAME-S.

    SAME-S works on pairs of latents (its 32-token chunks), so its latent count is
    rounded up to even, as the official MLX runner does; the audio is trimmed back
    to the requested length after decoding.
    """
    n = max(1, math.ceil(seconds * SAMPLE_RATE / SAMPLES_PER_LATENT))
    if codec_name == "same-s" and n % 2:
        n += 1
    return n


def latent_seconds_rule(seconds: float, headroom: float, codec: CodecLayout) -> tuple[int, int]:
    """Upstream ``generate()``'s length: ``(latents sampled, latents the attention sees)``.

    It samples ``seconds + headroom`` of latents, rounded up to whole encoder chunks
    (``chunk_size / stride`` latents, chunk_size 32 unless the config sets it), and lets
    the DiT attend only to ``ceil(int(seconds * sr) / 4096) + int(headroom * sr / 4096)``
    of them. (Upstream's ``sample_size`` argument, 120 s by default, also caps the
    length; no cap here.)
    """
    per_latent = PATCH_SIZE * codec.stride
    total = math.ceil(int((seconds + headroom) * codec.sample_rate) / per_latent)
    align = codec.chunk_size // codec.stride
    total = math.ceil(total / align) * align
    valid = math.ceil(int(seconds * codec.sample_rate) / per_latent) + int(headroom * codec.sample_rate / per_latent)
    return total, min(valid, total)


def effective_latents(seconds: float) -> int:
    """The length a length-dependent schedule shift sees (upstream use_effective_length_for_schedule)."""
    return math.ceil(int(seconds * SAMPLE_RATE) / SAMPLES_PER_LATENT)


def inpaint_keep_mask(ranges: Sequence[tuple[float, float]], seconds: float, n_latents: int) -> np.ndarray:
    """``[n_latents]`` float mask, 1 = keep the init latent, 0 = regenerate.

    Follows the PyTorch reference: regenerate samples ``[int(start*sr), int(end*sr))``
    of each range and everything past ``seconds``, then take latent ``j`` from
    sample ``4096 * j`` (nearest downsampling).
    """
    total = int(seconds * SAMPLE_RATE)
    sample_of_latent = np.arange(n_latents) * SAMPLES_PER_LATENT
    keep = sample_of_latent < total
    for start, end in ranges:
        lo, hi = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        keep &= ~((sample_of_latent >= lo) & (sample_of_latent < hi))
    return keep.astype(np.float32)


@dataclass
class GenerationPlan:
    mode: str  # one of MODES
    latents: int
    init_noise_level: float
    inpaint: list[tuple[float, float]]  # ranges to regenerate, continuation tail included
    warnings: list[str]
    # With headroom: the latents the DiT attends to (upstream generate()'s padding mask); None = all.
    valid_latents: int | None = None
    # The schedule: upstream's shift options (None: the LogSNR rate-0 default), whether they are the
    # model's own, and the steps + 1 noise levels (float32 values) from init_noise_level down to 0.
    shift: dict | None = None
    shift_is_model: bool = True
    sigmas: tuple[float, ...] = ()

    @property
    def shift_description(self) -> str:
        """The shift as ``--shift`` spells it (a model's own: as its config gives it)."""
        if self.shift is None:
            text = "logsnr:rate=0.0"  # upstream's default LogSNRShift (its other parameters: the defaults)
        else:
            params = ",".join(f"{k}={v!r}" for k, v in self.shift.items() if k != "type")
            text = self.shift["type"] + (":" + params if params else "")
        return text + (" (the model's)" if self.shift_is_model else "")


def schedule(settings, source, level: float) -> tuple[dict | None, bool, tuple[float, ...]]:
    """``(shift options, whether they are the model's, noise levels)`` of (resolved) ``settings``.

    A shift whose levels do not fall strictly from ``level`` to 0 at this length and step count
    (possible with extreme parameters) is refused: the ODE samplers would divide by zero steps.
    """
    own = settings.shift == "model"
    shift = source.shift if own else shift_options(settings.shift)
    levels = build_schedule(settings.steps, level, shift, effective_latents(settings.seconds))
    sigmas = [float(v) for v in np.array(levels)]
    if not (all(math.isfinite(v) for v in sigmas) and all(a > b for a, b in zip(sigmas, sigmas[1:]))
            and sigmas[-1] == 0.0):
        shown = ", ".join(f"{v:.4g}" for v in sigmas[:6]) + (", ..." if len(sigmas) > 6 else "")
        raise SettingsError("shift", f"{{shift}} {settings.shift} gives noise levels that do not fall steadily to 0 "
                                     f"over {settings.steps} steps of {settings.seconds:g} s ({shown})")
    return shift, own, tuple(sigmas)


def make_plan(settings, source, codec: str, init_audio: np.ndarray | None = None) -> GenerationPlan:
    """The plan of ``settings`` (checked by :func:`sa3_mlx.settings.validate`, the model's defaults
    filled in: :meth:`Pipeline.resolve`) on ``source`` with ``codec``.

    ``init_audio`` is the decoded ``[2, samples]`` audio at 44.1 kHz, or None.
    """
    seconds = settings.seconds
    inpaint = [(float(a), float(b)) for a, b in settings.inpaint]
    if inpaint and init_audio is None:
        raise ValueError("inpainting needs init audio")
    warnings = []
    trained = source.training_seconds
    if trained is not None and seconds > trained + 1e-6:
        warnings.append(f"{seconds:g} s is longer than the {trained:.0f} s this model was trained on; quality may drop")
    if codec != source.codec:
        warnings.append(f"decoder {codec}: {source.name} was trained with {source.codec}; expect degraded audio")
    mode = "text-to-audio"
    if init_audio is not None:
        init_audio = np.asarray(init_audio, dtype=np.float32)
        if init_audio.ndim != 2 or init_audio.shape[0] != 2 or init_audio.shape[1] == 0:
            raise ValueError(f"init audio must be [2, samples] with samples > 0 (got shape {init_audio.shape})")
        init_seconds = init_audio.shape[1] / SAMPLE_RATE
        if init_seconds < seconds - 0.5 / SAMPLE_RATE:
            # Continuation: the part past the end of the init audio is generated.
            inpaint.append((init_seconds, seconds))
            mode = "continuation" if len(inpaint) == 1 else "inpainting"
        else:
            mode = "inpainting" if inpaint else "audio-to-audio"
            if init_seconds > seconds + 0.5 / SAMPLE_RATE:
                warnings.append(f"init audio is {init_seconds:.2f} s; only its first {seconds:g} s are used")
    level = settings.init_noise_level
    if level is None:
        level = 0.9 if mode == "audio-to-audio" else 1.0
    if not level >= MIN_NOISE_LEVEL:
        raise ValueError(f"init noise level must be >= {MIN_NOISE_LEVEL} (got {level})")
    n_lat, valid = latent_length(seconds, codec), None
    if settings.headroom > 0:
        n_lat, valid = latent_seconds_rule(seconds, settings.headroom, source.codec_layout(codec))
    shift, own, sigmas = schedule(settings, source, float(level))
    return GenerationPlan(mode, n_lat, float(level), inpaint, warnings, valid, shift, own, sigmas)
