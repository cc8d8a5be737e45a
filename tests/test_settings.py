"""The settings table: both front ends accept and refuse exactly the same values, with the same words;
the OpenAPI schema states every bound; metadata round-trips into a command that runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from sa3_mlx import settings as table
from sa3_mlx.arguments import UsageError
from sa3_mlx.cli.generate import build_parser, parse_settings
from sa3_mlx.settings import FIELD, FIELDS, MAX_SEED, MODEL_DEFAULT, SettingsError, fields_for
from sa3_mlx.studio.settings import BadRequest, Limits
from sa3_mlx.studio.settings import parse_settings as parse_request

REPO = Path(__file__).resolve().parents[1]


def _numbers(f) -> list:
    """Each numeric field's edges: just inside and just outside every bound, and absurd values."""
    values = []
    step = 1 if f.kind == "int" else 1e-9 * max(1.0, abs(f.maximum or 1.0))
    for bound, inside, exclusive in ((f.minimum, +1, f.exclusive_minimum), (f.maximum, -1, f.exclusive_maximum)):
        if bound is None:
            continue
        values += [bound + inside * step, bound - inside * step]
        if not exclusive:
            values.append(bound)
        else:
            values.append(bound)  # refused
    values += [10**30, -(10**30)]
    if f.kind == "float":
        values += [1e300, -1e300]
    return [int(v) if f.kind == "int" else float(v) for v in values]


def cases():
    """(field name, value) pairs covering every field both front ends show."""
    out = []
    for f in fields_for("api"):
        if f.kind in ("int", "float"):
            out += [(f.name, v) for v in _numbers(f)]
        elif f.kind == "choice":
            out += [(f.name, c) for c in f.choices] + [(f.name, "nonsense")]
        elif f.kind == "text":
            out += [(f.name, ""), (f.name, "x" * f.max_chars), (f.name, "x" * (f.max_chars + 1)),
                    (f.name, "lone \ud800 surrogate"), (f.name, "ünïcødé ♪")]
        elif f.kind == "bool":
            out += [(f.name, True), (f.name, False)]
        elif f.kind == "ranges":
            out += [(f.name, [[0.0, 1.0]]), (f.name, [[1.0, 1.0]]), (f.name, [[-1.0, 1.0]]), (f.name, [[1.0, 31.0]]),
                    (f.name, [[0.0, 0.5]] * (f.max_items + 1)), (f.name, [[0.1 * i, 0.1 * i + 0.05] for i in range(f.max_items)])]
        elif f.kind == "audio":
            out += [(f.name, None)]
        elif f.kind == "interval":
            out += [(f.name, [0.0, 1.0]), (f.name, [0.2, 0.2]), (f.name, [0.5, 0.2]), (f.name, [-0.1, 0.5]),
                    (f.name, [0.0, 1.1]), (f.name, [1e300, 1e300])]
        elif f.kind == "loras":
            out += [(f.name, ["a:0.5"]), (f.name, ["a:0.5@0.2-0.8", "b"]), (f.name, ["a:11"]), (f.name, ["a:1e308"]),
                    (f.name, ["a@0.8-0.2"]), (f.name, ["a"] * (f.max_items + 1)), (f.name, ["a;cond=0.5"])]
        elif f.kind == "shift":
            out += [(f.name, c) for c in f.choices] + [(f.name, "nonsense"), (f.name, "flux:alpha_min=2,alpha_max=2"),
                                                      (f.name, "flux:alpha_min=1e300"), (f.name, "logsnr:bogus=1")]
        else:
            raise AssertionError(f"no boundary cases for the {f.kind!r} kind of {f.name!r}: add them here")
    return out


def _cli_words(name, value) -> list[str]:
    f = FIELD[name]
    if f.kind == "bool":
        return [f.cli_flag if value else "--no-" + f.cli_flag[2:]]
    if f.kind == "ranges":
        return [w for a, b in value for w in (f.cli_flag, f"{a!r},{b!r}")]
    if f.kind == "interval":
        return [f.cli_flag, f"{value[0]!r},{value[1]!r}"]
    if f.kind == "loras":
        return [w for spec in value for w in (f.cli_flag, spec)]
    if value is None:
        return []
    return [f.cli_flag, repr(value) if isinstance(value, float) else str(value)]


def _base(name) -> dict:
    """The other settings a case needs to be judged on its own (inpainting needs init audio)."""
    base = {"prompt": "x"}
    if name == "inpaint":
        base["init_audio"] = "in.wav"
    return base


def _via_cli(name, value):
    base = _base(name)
    words = []
    for key, v in base.items():
        if key != name:
            words += [FIELD[key].cli_flag, v]
    words += _cli_words(name, value)
    try:
        return parse_settings(build_parser().parse_args(words)), None
    except UsageError as e:
        return None, str(e)


def _via_api(name, value):
    body = {k: v for k, v in _base(name).items() if k != name}
    if name == "inpaint":
        body["init_audio"] = {"upload": "0123456789abcdef"}
    body[name] = value
    try:
        return parse_request(body, Limits()), None
    except BadRequest as e:
        return None, str(e)


@pytest.mark.parametrize("name, value", cases(), ids=lambda v: repr(v)[:40])
def test_cli_and_studio_accept_and_refuse_the_same_values(name, value):
    cli, cli_error = _via_cli(name, value)
    api, api_error = _via_api(name, value)
    assert (cli is None) == (api is None), (cli_error, api_error)
    if cli is None:
        # The same message, each naming the setting its own way.
        spelled = {f.cli_flag: f.name for f in FIELDS}
        as_api = cli_error
        for flag in sorted(spelled, key=len, reverse=True):
            as_api = as_api.replace(flag, spelled[flag])
        assert as_api == api_error
        assert FIELD[name].cli_flag in cli_error and name in api_error
    else:
        assert getattr(cli, name) == getattr(api, name) or FIELD[name].kind == "audio"


def test_every_numeric_setting_has_an_upper_bound_and_nan_makers_are_refused():
    for f in FIELDS:
        if f.kind in ("int", "float"):
            assert f.maximum is not None and math.isfinite(f.maximum), f.name
    for name, value in (("cfg", 1e300), ("steps", 2147483648), ("headroom", 1e12), ("num_outputs", 10**23)):
        with pytest.raises(SettingsError, match=name):
            table.validate({"prompt": "x", name: value})
    with pytest.raises(SettingsError, match="strength"):
        table.validate({"prompt": "x", "loras": ("a.safetensors:1e308",)})


def test_variation_seeds_wrap_into_the_seed_range():
    s = table.validate({"prompt": "x", "seed": MAX_SEED, "num_outputs": 3})
    assert [s.variation_seed(i) for i in range(3)] == [MAX_SEED, 0, 1]


def test_openapi_schema_states_every_bound_the_server_enforces():
    limits = Limits(max_seconds=60, max_steps=50, max_batch=2)
    schema = table.json_schema("api", limits.bounds())
    props = schema["properties"]
    assert set(props) == {f.name for f in fields_for("api")} and schema["additionalProperties"] is False
    assert props["seconds"]["maximum"] == 60 and props["seconds"]["exclusiveMinimum"] == 0
    assert props["steps"]["maximum"] == 50 and props["num_outputs"]["maximum"] == 2
    assert props["seed"]["maximum"] == MAX_SEED and props["seed"]["minimum"] == 0
    assert props["loudness"]["exclusiveMaximum"] == 0 and props["prompt"]["maxLength"] == FIELD["prompt"].max_chars
    for f in fields_for("api"):
        if f.kind in ("int", "float"):
            p = props[f.name]
            assert ("maximum" in p or "exclusiveMaximum" in p) and ("minimum" in p or "exclusiveMinimum" in p), f.name
    # What the schema states is what the parser enforces.
    with pytest.raises(BadRequest, match=r"seconds must be in \(0, 60\]"):
        parse_request({"prompt": "x", "seconds": 61}, limits)


def test_metadata_round_trips_into_the_same_settings():
    s = table.validate({"prompt": "drum 'fill'", "negative_prompt": "vocals", "seconds": 2.5, "steps": 3, "seed": 3,
                        "cfg": 2.5, "apg": 0.5, "init_audio": "in put.wav", "inpaint": ((0.5, 1.0),),
                        "format": "flac", "model": "sm-sfx", "decoder": "same-s", "loudness": -14.0,
                        "headroom": 1.5, "sampler": "euler", "free_models": False})
    again = table.from_metadata(table.to_metadata(s))
    assert again == s
    words = build_parser().parse_args(__import__("shlex").split(table.reproduce_command(s))[1:])
    assert parse_settings(words) == s


def test_model_defaults_are_marked_and_filled_by_the_pipeline_not_the_table():
    s = table.validate({"prompt": "x"})
    assert s.steps == s.cfg == s.sampler == MODEL_DEFAULT
    assert table.to_metadata(s)["steps"] is None  # JSON null: the model's default


def test_import_rules_of_the_package():
    """No import circles, no front end importing another, models free of CPU fast paths and device probes."""
    tool = REPO.parent / "shared" / "tools" / "import_rules.py"
    assert tool.is_file(), f"{tool} missing (the shared folder beside the checkout)"
    proc = subprocess.run([sys.executable, str(tool), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import ast

    for path in (REPO / "sa3_mlx" / "cli").rglob("*.py"):  # nor the CLI the studio (commands.py routes)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "studio" not in (node.module or ""), f"{path} imports the studio"


def test_importing_the_package_changes_no_process_setting():
    """Only what must precede MLX happens at import (the BLAS choice, fp32 on CUDA); memory reuse waits
    for an entry point."""
    code = ("import sa3_mlx.audio, sa3_mlx.settings; from sa3_mlx import backend; "
            "print(backend.memory_reuse_status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert out == "not attempted"
