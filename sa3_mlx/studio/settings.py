"""A generation request's settings: the settings table (:mod:`sa3_mlx.settings`) read from JSON,
within the server's limits.

Every generation setting the command line takes about the audio is accepted (the output
path, ``--overwrite``, ``--json`` and ``--play`` are the server's business; LoRA files and
original releases name server paths and stay on the command line). A bad value raises
:class:`BadRequest` with the message the command line gives, the setting named as JSON names
it; answered as 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import FIELD, ID_PATTERN, SettingsError, audio_reference, fields_for, from_request, to_metadata

__all__ = ["ID_PATTERN", "BadRequest", "Limits", "parse_settings", "api_settings"]


class BadRequest(ValueError):
    """A request the server refuses (400); the message says what is wrong."""


@dataclass
class Limits:
    """Bounds on what one request may ask for (``sa3 studio`` flags narrow the settings table's)."""

    max_seconds: float = FIELD["seconds"].maximum
    max_steps: int = FIELD["steps"].maximum
    max_batch: int = FIELD["num_outputs"].maximum
    max_upload_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 256 * 1024

    def public(self) -> dict:
        return dict(vars(self))

    def bounds(self) -> dict:
        """The table's bounds as this server narrows them (for validation and the OpenAPI schema)."""
        return {"seconds": {"maximum": self.max_seconds}, "steps": {"maximum": self.max_steps},
                "num_outputs": {"maximum": self.max_batch}}


def parse_settings(data, limits: Limits):
    """The checked :class:`~sa3_mlx.settings.GenerationSettings` of a job request (the seed may be None)."""
    try:
        return from_request(data, limits.bounds())
    except SettingsError as e:
        raise BadRequest(str(e)) from None


def api_settings(settings) -> dict:
    """Settings as the API spells them (what a job shows and what "Reuse settings" sends back)."""
    meta = to_metadata(settings)
    out = {f.name: meta[f.name] for f in fields_for("api")}
    if out["init_audio"] is not None:
        out["init_audio"] = audio_reference(out["init_audio"])
    return out
