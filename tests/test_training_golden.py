"""The training step against upstream's (golden/train/, README "golden/train/ and golden/sampling").

Every case runs upstream ``DiffusionCondTrainingWrapper.training_step`` on the tiny checkpoint
with stored draws; here the same step runs from the same inputs and ``before/`` tensors, with
the stored Fourier features injected (as the README says: an fp32 computation of them differs
by up to 4e-2). A correct fp32 re-implementation agrees to about 1e-6 relative:
``REL`` of the largest magnitude of each compared array.

AdamW step 1 moves each element by about lr * sign(g), so elements whose gradient is below
~1e-6 (README: ~70 of 52k) can legitimately move the other way. The tensors after the steps
are therefore compared with the error that the gradient tolerance propagates through AdamW
added per element (large only at such elements), and the optimizer alone is compared exactly
on the stored gradients.
"""

from __future__ import annotations

import io
import json
import re

import mlx.core as mx
import numpy as np
import pytest

from sa3_mlx import upstream
from sa3_mlx.runtime import training_step_modes
from sa3_mlx.training import objective
from sa3_mlx.training.adapters import PARAMS, AdapterConfig, LoraParametrization, param_key
from sa3_mlx.training.optimizer import AdamW
from sa3_mlx.training.step import Batch, TrainStep

from .util import load_case

REL = 2e-6
CASES = ("lora", "dora-rows", "lora-xs", "bora", "lora_filtered", "trainlora")
CONDITIONING = ("seconds_embed", "prompt_embeds_padded", "cross_attn_cond", "cross_attn_cond_used", "global_cond",
                "local_add_cond", "target", "v", "loss_mask")


def close(actual, expected, what: str, rel: float = REL, scale: float | None = None) -> float:
    """Max abs error within ``rel`` of ``scale`` (default: the largest |expected|)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = float(np.abs(a - e).max()) if a.size else 0.0
    if scale is None:
        scale = float(np.abs(e).max()) if e.size else 0.0
    bound = rel * max(scale, 1e-30)
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g} ({rel} of max |expected|)"
    return err


@pytest.fixture(scope="module")
def model(golden):
    return upstream.load(golden / "upstream_ckpt")


def _config(case) -> AdapterConfig:
    c = json.loads(str(case["lora_config_json"]))
    tup = (lambda v: None if v is None else tuple(v))
    return AdapterConfig(c["adapter_type"], c["rank"], c["alpha"], tup(c["include"]), tup(c["exclude"]))


def _optimizer(case) -> AdamW:
    o = json.loads(str(case["optimizer_json"]))["config"]
    return AdamW(lr=o["lr"], betas=tuple(o["betas"]), eps=o.get("eps", 1e-8), weight_decay=o["weight_decay"])


def _bases(case) -> dict:
    out = {}
    for key in case:
        if key.startswith("bases/") and key.endswith(".U"):
            out[key[len("bases/"):].split(".parametrizations.")[0]] = (case[key], case[key[:-1] + "V"])
    return out


def _batch(case) -> Batch:
    a = lambda k: mx.array(case[k])  # noqa: E731
    return Batch(x0=a("x0"), noise=mx.array(case["noise"][case["noise_perm"]]), t=a("t"),
                 prompt_embeds=a("prompt_embeds"), prompt_mask=a("prompt_mask"), seconds=a("seconds_total"),
                 cfg_keep=a("cfg_dropout_keep"), padding_mask=a("attn_padding_mask"),
                 inpaint_mask=mx.array(case["inpaint_mask"][:, 0]), timestep_features=a("timestep_features"),
                 seconds_features=a("seconds_features"))


@pytest.fixture(scope="module", params=CASES)
def run(request, model, golden):
    name = request.param
    case = load_case(golden / "train", f"case_train_{name}.npz")
    lora = LoraParametrization.build(model.dit_weights, _config(case), bases=_bases(case) or None)
    dit, conditioner = model.load_dit()
    # compiled, with merged weights, as GPUs run it under SA3_COMPILE=1 (scripts/test.sh --gpu-path), plain otherwise
    step = TrainStep(dit, conditioner, lora, mask_loss_weight=1.0 if name == "trainlora" else 0.0,
                     **training_step_modes(None, None))
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    batch = _batch(case)
    out = step.forward(params, batch)
    loss, grads = step.loss_and_grad(params, batch)
    opt = _optimizer(case)
    after, _ = opt.update(params, grads)
    loss2, grads2 = step.loss_and_grad(after, batch)
    after2, _ = opt.update(after, grads2)
    # The second gradient where upstream took it: at its own tensors after step 1. At ours, AdamW's first step
    # (g / (|g| + eps)) turns the rounding of gradients near eps into parameter differences that move grad2
    # (on a GPU by 1.4x the bound in the lora case, while grad2 at upstream's tensors is within 1e-7 of a
    # float64 computation there); the chain through our own step is what after2 checks.
    case_after = {k: mx.array(case["after/" + k]) for k in params}
    _, grads2_at_case = step.loss_and_grad(case_after, batch)
    mx.eval(out, loss, grads, after, loss2, grads2, after2, grads2_at_case)
    return dict(name=name, case=case, lora=lora, params=params, out=out, loss=loss, grads=grads, after=after,
                loss2=loss2, grads2=grads2, after2=after2, grads2_at_case=grads2_at_case)


def test_targets_and_initial_values(run):
    """The targeted modules in upstream's order; the trainable names; the magnitudes keep upstream's init."""
    case, lora = run["case"], run["lora"]
    assert lora.modules == [str(m) for m in case["lora_modules"]]
    init = lora.init_params(seed=0)
    assert set(init) == set(run["params"])
    for key, value in init.items():
        assert value.shape == run["params"][key].shape, key
        if key.rsplit(".", 1)[1].startswith("magnitude"):
            close(value, case["before/" + key], f"initial {key}")
        if key.endswith(("lora_B", "M_xs")):
            assert not np.any(np.array(value)), f"{key} starts at zero"


def test_forward_and_loss(run):
    case, out = run["case"], run["out"]
    for key in CONDITIONING:
        close(out[key], case[key], f"{run['name']} {key}")
    if "noised" in case:
        close(out["noised"], case["noised"], f"{run['name']} noised")
    close(out["signal_loss"], case["signal_loss"], "signal_loss")
    close(out["loss"], case["loss"], "loss")
    close(run["loss"], case["loss"], "loss (value_and_grad)")
    close(run["loss2"], case["loss2"], "loss after one AdamW step")


def test_every_gradient(run):
    """Each LoRA gradient, relative to the case's largest gradient (the errors are those of the
    shared backward pass, not of each tensor's own size)."""
    case, grads = run["case"], run["grads"]
    assert set(grads) == {k[len("grad/"):] for k in case if k.startswith("grad/")}
    scale = max(float(np.abs(case["grad/" + k]).max()) for k in grads)
    for key, g in grads.items():
        close(g, case["grad/" + key], f"grad {key}", scale=scale)
        zero = case["grad/" + key] == 0
        assert not np.any(np.array(g)[zero]), f"grad {key}: upstream's exact zeros are not zero"
    stored2 = [k[len("grad2/"):] for k in case if k.startswith("grad2/")]
    if stored2:
        scale2 = max(float(np.abs(case["grad2/" + k]).max()) for k in stored2)
        for key in stored2:
            close(run["grads2_at_case"][key], case["grad2/" + key], f"grad2 {key}", scale=scale2)
    if run["name"] == "trainlora":  # CAUSAL context: the local-embed LoRA gets gradient
        assert any(np.abs(case["grad/" + k]).max() > 0 for k in grads if "to_local_embed.0" in k)


def _adamw_np(p, grads, lr, betas, eps, wd):
    """torch.optim.AdamW in float64 numpy (the README's formula), for the error propagation."""
    m = v = 0.0
    for k, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - (lr / (1 - betas[0] ** k)) * m / (np.sqrt(v) / np.sqrt(1 - betas[1] ** k) + eps)
    return p


def _adam_close(actual: dict, case: dict, prefix: str, grads: list[dict], opt: AdamW, grad_tol: float):
    """Each element within REL of the tensor's magnitude plus the change that a gradient error
    of ``grad_tol`` (the gradient test's bound) can cause through AdamW at that element (worst
    case over the error's signs). The sign-of-gradient steps make the latter large only where
    a gradient (or the step-2 momentum) is tiny."""
    moved, total = 0, 0
    for key, a in actual.items():
        a, e = np.asarray(a, np.float64), case[prefix + key].astype(np.float64)
        before = case["before/" + key].astype(np.float64)
        gs = [np.asarray(g[key], np.float64) for g in grads]
        nominal = _adamw_np(before, gs, opt.lr, opt.betas, opt.eps, opt.weight_decay)
        spread = np.zeros(e.shape)
        for signs in np.ndindex(*(2,) * len(gs)):
            # Exact zeros are structural (no input reaches the module) and reproduced exactly.
            pert = [g + np.where(g == 0, 0.0, grad_tol * (2 * s - 1)) for g, s in zip(gs, signs)]
            spread = np.maximum(spread, np.abs(_adamw_np(before, pert, opt.lr, opt.betas, opt.eps, opt.weight_decay)
                                               - nominal))
        bound = REL * max(float(np.abs(e).max()), 1e-30) + spread
        err = np.abs(a - e)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound), f"{prefix}{key}: err {err[worst]:.3g} > bound {bound[worst]:.3g}"
        moved += int((spread > 0.1 * opt.lr).sum())
        total += e.size
    # Not vacuous: the propagated bound reaches a tenth of a step at only a few elements.
    assert moved <= 0.01 * total, f"{moved} of {total} elements allow a tenth of a step"


def test_adamw_matches_torch(run):
    """The optimizer alone: the stored gradients through our AdamW give the stored tensors."""
    case = run["case"]
    opt = _optimizer(case)
    params = {k: mx.array(case["before/" + k]) for k in run["grads"]}
    after, _ = opt.update(params, {k: mx.array(case["grad/" + k]) for k in params})
    for key, value in after.items():
        close(value, case["after/" + key], f"after/{key}")
    if any(k.startswith("grad2/") for k in case):
        after2, _ = opt.update(after, {k: mx.array(case["grad2/" + k]) for k in params})
        for key, value in after2.items():
            close(value, case["after2/" + key], f"after2/{key}")


def test_training_steps(run):
    """Our gradients and our AdamW, two steps, against the stored tensors after each step."""
    case = run["case"]
    opt = _optimizer(case)
    scale = max(float(np.abs(case["grad/" + k]).max()) for k in run["grads"])
    g1 = {k: case["grad/" + k] for k in run["grads"]}
    g2 = {k: case["grad2/" + k] if "grad2/" + k in case else np.array(v) for k, v in run["grads2"].items()}
    _adam_close(run["after"], case, "after/", [g1], opt, REL * scale)
    _adam_close(run["after2"], case, "after2/", [g1, g2], opt, REL * scale)


# ---- the random parts, from the stored draws -----------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_timestep_shift_and_lengths(golden, name):
    case = load_case(golden / "train", f"case_train_{name}.npz")
    lengths = objective.effective_lengths(case["seconds_total"])
    np.testing.assert_array_equal(lengths, case["effective_seq_len"])
    shift = {"type": "full", "base_shift": 0.5, "max_shift": 1.15, "min_length": 256, "max_length": 4096}
    close(objective.training_shift(case["t_sampled"], lengths, shift), case["t"], "shifted t")


def test_train_lora_draws(golden):
    """train_lora.py's settings: trunc-logit-normal t, silence extension, the CAUSAL mask, OT coupling."""
    case = load_case(golden / "train", "case_train_trainlora.npz")
    close(objective.sample_timesteps("trunc_logit_normal", normal=case["t_normal"]), case["t_sampled"], "t_sampled")
    T = case["x0"].shape[-1]
    valid = objective.silence_extension(case["padding_mask"].sum(1).astype(int), case["silence_ext_draw"], T)
    np.testing.assert_array_equal(valid, [16, 14])
    np.testing.assert_array_equal((np.arange(T)[None] < valid[:, None]).astype(np.float32), case["attn_padding_mask"])
    masks = [objective.inpaint_mask(objective.CAUSAL, T, valid[0], prefix=5),
             objective.inpaint_mask(objective.FULL_MASK, T, valid[1])]
    np.testing.assert_array_equal(np.stack(masks)[:, None], case["inpaint_mask"])
    np.testing.assert_array_equal(objective.ot_coupling(case["x0"], case["noise"]), case["noise_perm"])


def test_timestep_samplers_and_shifts(golden):
    c = load_case(golden / "train", "case_timesteps.npz")
    z, u = c["normal_draw"], c["uniform_draw"]
    close(objective.sample_timesteps("log_snr", normal=z), c["log_snr"], "log_snr")
    close(objective.sample_timesteps("log_snr_uniform", uniform=u), c["log_snr_uniform"], "log_snr_uniform")
    close(objective.sample_timesteps("logit_normal", normal=z), c["logit_normal"], "logit_normal")
    close(objective.trunc_logit_normal_raw(z), c["trunc_logit_normal_raw"], "trunc_logit_normal_raw")
    close(objective.sample_timesteps("trunc_logit_normal", normal=z), c["trunc_logit_normal"], "trunc_logit_normal")
    shift = json.loads(str(c["full_shift_options_json"]))
    for i, n in enumerate(c["seq_lens"]):
        close(objective.training_shift(c["t"], np.full(c["t"].shape, n), shift), c["full_tensor"][i], f"full L={n}")
        close(objective.training_shift(c["t"], np.full(c["t"].shape, n), shift), c["full_scalar"][i], f"full L={n}")
    close(objective.training_shift(c["full_train_elementwise_t"], c["full_train_elementwise_len"], shift),
          c["full_train_elementwise"], "full per item")


def test_filters_select_upstreams_modules(model, golden):
    """Include/exclude as upstream: ``layers[0-0]`` expands to ``layers0`` and selects nothing."""
    case = load_case(golden / "train", "case_train_lora_filtered.npz")
    for row in json.loads(str(case["filter_table_json"])):
        tup = (lambda v: None if v is None else tuple(v))
        config = AdapterConfig("lora", 4, 8, tup(row["include"]), tup(row["exclude"]))
        assert LoraParametrization.build(model.dit_weights, config).modules == row["modules"], row


def test_gradient_checkpointing_gives_the_same_step(model, golden):
    """--checkpointing recomputes the blocks in the backward pass: the same loss and gradients (with the
    factored adapters, its default, and with merged weights asked for: the blocks take them as inputs)."""
    case = load_case(golden / "train", "case_train_dora-rows.npz")
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    results = []
    for checkpointing, merged in ((False, False), (True, False), (True, True)):
        lora = LoraParametrization.build(model.dit_weights, _config(case))
        dit, conditioner = model.load_dit()
        step = TrainStep(dit, conditioner, lora, checkpointing=checkpointing, merged_weights=merged)
        loss, grads = step.loss_and_grad(params, _batch(case))
        results.append((float(loss), {k: np.array(v) for k, v in grads.items()}))
    scale = max(float(np.abs(g).max()) for g in results[0][1].values())
    for loss, grads in results[1:]:
        assert abs(results[0][0] - loss) <= REL * abs(results[0][0])
        for key, g in results[0][1].items():
            close(grads[key], g, f"checkpointed grad {key}", scale=scale)
        close(loss, case["loss"], "checkpointed loss")


@pytest.mark.parametrize("name", ["dora-rows", "lora-xs", "lora_filtered", "trainlora"])
def test_fused_step_gives_upstreams_step(model, golden, name):
    """sa3 train --fused (compiled blocks shared by the layers, the backward pass written out
    block by block): upstream's loss and every gradient, as the plain step. The cases cover
    the -xs bases (per-layer constants), a filter that leaves layers built differently (two
    traces), and train_lora.py's inpaint masks and context loss."""
    case = load_case(golden / "train", f"case_train_{name}.npz")
    lora = LoraParametrization.build(model.dit_weights, _config(case), bases=_bases(case) or None)
    dit, conditioner = model.load_dit()
    step = TrainStep(dit, conditioner, lora, mask_loss_weight=1.0 if name == "trainlora" else 0.0, fused=True)
    layers = {}
    for module in lora.modules:
        if module.startswith("model.transformer.layers."):
            i, rest = module[len("model.transformer.layers."):].split(".", 1)
            layers.setdefault(int(i), set()).add(rest)
    kinds = {frozenset(layers.get(i, ())) for i in range(len(dit.transformer.layers))}
    assert step._fused.traces == len(kinds)  # one trace per kind of layer
    if name == "lora_filtered":
        assert len(kinds) > 1
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    loss, grads = step.loss_and_grad(params, _batch(case))
    close(loss, case["loss"], f"fused {name} loss")
    assert set(grads) == {k[len("grad/"):] for k in case if k.startswith("grad/")}
    scale = max(float(np.abs(case["grad/" + k]).max()) for k in grads)
    for key, g in grads.items():
        close(g, case["grad/" + key], f"fused {name} grad {key}", scale=scale)
    # the layers' modules hold their own weights again (the trace swaps a template's in and out)
    after, _ = step.loss_and_grad(params, _batch(case))
    assert float(after) == float(loss)


@pytest.mark.parametrize("name", ["dora-rows", "bora", "trainlora"])
def test_compiled_step_gives_upstreams_step(model, golden, name):
    """The GPUs' default (the forward and backward pass as one mx.compile'd graph): upstream's loss and every
    gradient; later calls run the trace with their own tensors and batch (nothing of the first is kept), and
    another batch shape gets its own trace."""
    case = load_case(golden / "train", f"case_train_{name}.npz")
    lora = LoraParametrization.build(model.dit_weights, _config(case), bases=_bases(case) or None)
    dit, conditioner = model.load_dit()
    step = TrainStep(dit, conditioner, lora, mask_loss_weight=1.0 if name == "trainlora" else 0.0, compiled=True)
    assert step.compiled
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    batch = _batch(case)
    loss, grads = step.loss_and_grad(params, batch)
    close(loss, case["loss"], f"compiled {name} loss")
    assert set(grads) == {k[len("grad/"):] for k in case if k.startswith("grad/")}
    scale = max(float(np.abs(case["grad/" + k]).max()) for k in grads)
    for key, g in grads.items():
        close(g, case["grad/" + key], f"compiled {name} grad {key}", scale=scale)
    # upstream's tensors after its first AdamW step: its second gradient, through the same trace
    after = {k: mx.array(case["after/" + k]) for k in params}
    loss2, grads2 = step.loss_and_grad(after, batch)
    plain = TrainStep(*model.load_dit(), LoraParametrization.build(model.dit_weights, _config(case),
                      bases=_bases(case) or None), mask_loss_weight=step.mask_loss_weight)
    loss2_plain, grads2_plain = plain.loss_and_grad(after, batch)
    assert float(loss2_plain) != float(loss)
    close(loss2, loss2_plain, f"compiled {name} loss at step 2")  # equal on the CPU (measured), fused on a GPU
    scale = max(float(np.abs(g).max()) for g in grads2_plain.values())
    for key in grads2:
        close(grads2[key], grads2_plain[key], f"compiled {name} grad at step 2 {key}", scale=scale)
    # a shorter crop: a new trace, the plain step's values
    short = Batch(**{f: (v[..., :-8] if f in ("x0", "noise") else v[:, :-8] if f in ("padding_mask", "inpaint_mask")
                         else v) for f, v in vars(batch).items()})
    loss3, loss3_plain = step.loss_and_grad(params, short)[0], plain.loss_and_grad(params, short)[0]
    assert float(loss3_plain) != float(loss)
    close(loss3, loss3_plain, f"compiled {name} loss of a shorter crop")


@pytest.mark.parametrize("name", CASES)
def test_merged_weights_give_upstreams_step(model, golden, name):
    """The GPUs' default (each stack forms its layers' adapted weights once per step, TrainStep(merged_weights=True)):
    upstream's loss and every gradient, with fewer products than the factored form; compiled too."""
    case = load_case(golden / "train", f"case_train_{name}.npz")
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    batch = _batch(case)
    counts, stacked = [], False
    for merged, compiled in ((True, False), (False, False), (True, True)):
        lora = LoraParametrization.build(model.dit_weights, _config(case), bases=_bases(case) or None)
        step = TrainStep(*model.load_dit(), lora, mask_loss_weight=1.0 if name == "trainlora" else 0.0,
                         merged_weights=merged, compiled=compiled)
        assert all(stack.merged == merged for stack in step._stacks)
        stacked = bool(step._stacks)
        loss, grads = step.loss_and_grad(step.pack(params), batch)
        if not compiled:
            counts.append(_matmuls([loss, *grads.values()]))
        if merged:
            grads = step.unpack(grads)
            close(loss, case["loss"], f"merged {name} loss")
            scale = max(float(np.abs(case["grad/" + k]).max()) for k in grads)
            for key, g in grads.items():
                close(g, case["grad/" + key], f"merged {name} grad {key}", scale=scale)
    # (the filtered cases adapt one block: no stack, nothing merged)
    assert counts[0] < counts[1] if stacked else counts[0] == counts[1]


def _matmuls(outputs) -> int:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return len(re.findall(r'label ="Matmul"', dot.getvalue()))


@pytest.mark.parametrize("name", ["dora-rows", "bora", "lora-xs"])
def test_modules_across_blocks_run_at_once(model, golden, name):
    """The modules whose inputs are the same for every block (the context's keys and values, the local
    conditioning's embedding) run for all blocks at once when one stack holds them all: the per-block step's
    loss and gradients, with fewer products (bora has row and column scales, -xs its frozen bases)."""
    case = load_case(golden / "train", f"case_train_{name}.npz")
    steps = []
    for _ in range(2):
        lora = LoraParametrization.build(model.dit_weights, _config(case), bases=_bases(case) or None)
        steps.append(TrainStep(*model.load_dit(), lora))
    steps[1]._across = {}
    assert set(steps[0]._across) == {"cross_attn.to_kv", "to_local_embed.0", "to_local_embed.2"}
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    (loss, grads), (loss_b, grads_b) = (s.loss_and_grad(s.pack(params), _batch(case)) for s in steps)
    assert _matmuls([loss, *grads.values()]) < _matmuls([loss_b, *grads_b.values()])
    close(loss, loss_b, f"{name} loss")
    scale = max(float(np.abs(g).max()) for g in grads_b.values())
    for key, g in grads_b.items():
        close(grads[key], g, f"{name} grad {key}", scale=scale)


def test_packed_layout_is_the_same_step(model, golden):
    """What a trainer steps in (TrainStep.pack: each stacked module kind's tensors of one name as one array):
    fewer tensors, the same gradients and AdamW updates, and back to the saved names exactly."""
    case = load_case(golden / "train", "case_train_dora-rows.npz")
    lora = LoraParametrization.build(model.dit_weights, _config(case))
    step = TrainStep(*model.load_dit(), lora)
    params = {k[len("before/"):]: mx.array(v) for k, v in case.items() if k.startswith("before/")}
    packed = step.pack(params)
    assert len(packed) < len(params) and any(k.startswith("packed.") for k in packed)
    back = step.unpack(packed)
    assert list(back) == [k for k in (param_key(t.module, p) for t in lora.targets for p in PARAMS["dora-rows"])]
    for k in params:
        np.testing.assert_array_equal(np.array(back[k]), np.array(params[k]), err_msg=k)
    loss, grads = step.loss_and_grad(params, _batch(case))
    loss_p, grads_p = step.loss_and_grad(packed, _batch(case))
    assert set(grads_p) == set(packed) and float(loss_p) == float(loss)
    for k, g in step.unpack(grads_p).items():
        np.testing.assert_array_equal(np.array(g), np.array(grads[k]), err_msg=k)
    after, _ = _optimizer(case).update(params, grads)
    after_p, _ = _optimizer(case).update(packed, grads_p)
    for k, p in step.unpack(after_p).items():
        np.testing.assert_array_equal(np.array(p), np.array(after[k]), err_msg=k)


def test_compiled_adamw_equals_the_plain_update(golden):
    """The GPU default (one mx.compile'd update of every tensor) gives the plain update's values,
    with warm-up and clipping, over steps whose learning rate changes."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (7,), (2, 5)]
    params = {f"p{i}": mx.array(rng.standard_normal(shape).astype(np.float32)) for i, shape in enumerate(shapes)}
    steps = [{f"p{i}": mx.array(rng.standard_normal(shape).astype(np.float32) * (k + 1))
              for i, shape in enumerate(shapes)} for k in range(3)]
    results = []
    for compiled in (False, True):
        opt, p, norms = AdamW(lr=1e-2, warmup_steps=2, clip_norm=0.5, compiled=compiled), dict(params), []
        for grads in steps:
            p, norm = opt.update(p, grads)
            norms.append(float(norm))
        results.append((p, norms, opt.arrays()))
    (p0, n0, s0), (p1, n1, s1) = results
    assert n0 == pytest.approx(n1, rel=1e-6)
    for name in p0:
        np.testing.assert_allclose(np.array(p1[name]), np.array(p0[name]), rtol=1e-6, atol=1e-7)
    assert set(s0) == set(s1)
    for name in s0:
        np.testing.assert_allclose(np.array(s1[name]), np.array(s0[name]), rtol=1e-6, atol=1e-9)
