"""Optimizer state kinds (`optim.state`) and EMA storage (`optim.ema_storage`): AF2's Adam recipe kept, and
checkpoints that resume exactly with each kind.

torchao's low-bit Adam compiles its per-tensor update with inductor; on CPU that takes about a minute per
run of new shapes, so these tests compile it with the eager backend (the same traced code, no C++ build).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from protfold.config import OptimConfig
from protfold.train import optimizers
from protfold.train.ema import EMA
from protfold.train.step import adam, clip_and_step

torchao = pytest.importorskip("torchao", reason="optim.state 8bit/4bit need torchao: pip install 'protfold[lowbit]'")


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def _params(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_lowbit_adam_keeps_af2_recipe(eager_compile, state):
    """Below 4096 elements torchao keeps fp32 moments, so the update must equal torch's Adam: the same eps
    (1e-6, which matters for small second moments), betas, clipping and the scheduler's learning rate."""
    cfg = OptimConfig(state=state, eps=1e-6)
    ref_p, low_p = _params((7, 5), (3,)), _params((7, 5), (3,))
    ref, low = adam(ref_p, OptimConfig()), adam(low_p, cfg)
    assert type(low).__name__ == {"8bit": "Adam8bit", "4bit": "Adam4bit"}[state]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: (k + 1) / 3) for o in (ref, low)]
    for step in range(3):
        for params, opt, sched in ((ref_p, ref, scheds[0]), (low_p, low, scheds[1])):
            _grads(params, step)
            for p in params:
                p.grad.mul_(1e-4)  # second moments near eps**2: eps decides the step size
            clip_and_step(opt, params, cfg.grad_clip)
            sched.step()
    for a, b in zip(ref_p, low_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert float(low.param_groups[0]["lr"]) == pytest.approx(ref.param_groups[0]["lr"], rel=1e-6)
    other = _params((7, 5), (3,))
    opt = adam(other, OptimConfig(state=state, eps=1e-3))
    _grads(other, 0)
    for p in other:
        p.grad.mul_(1e-4)
    opt.step()
    assert not torch.allclose(other[0], low_p[0]), "eps had no effect"


@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_lowbit_adam_honours_param_groups(eager_compile, state):
    def groups(params):
        return [{"params": params[:1], "lr": 1e-2}, {"params": params[1:]}]

    ref_p, low_p = _params((7, 5), (3,)), _params((7, 5), (3,))
    ref = torch.optim.Adam(groups(ref_p), lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    low = adam(groups(low_p), OptimConfig(state=state))
    for step in range(3):
        for params, opt in ((ref_p, ref), (low_p, low)):
            _grads(params, step)
            opt.step()
    for a, b in zip(ref_p, low_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_quantized_state_survives_a_checkpoint(eager_compile, tmp_path, state):
    """Saved as Lightning does (torch.save of the state dict, torch.load with a callable map_location) and
    restored, the quantized moments continue exactly as the uninterrupted optimizer's."""
    from protfold.train.optimizers import decode_optimizer_states, encode_optimizer_states

    straight, resumed = _params((64, 128), (3,)), _params((64, 128), (3,))
    opt = adam(straight, OptimConfig(state=state))
    for step in range(2):
        _grads(straight, step)
        opt.step()
    ckpt = {"optimizer_states": [opt.state_dict()]}
    encode_optimizer_states(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", map_location=lambda storage, loc: storage, weights_only=False)
    decode_optimizer_states(loaded)
    with torch.no_grad():
        for a, b in zip(straight, resumed):
            b.copy_(a)
    again = adam(resumed, OptimConfig(state=state))
    again.load_state_dict(loaded["optimizer_states"][0])
    assert type(again.state[resumed[0]]["exp_avg"]) is type(opt.state[straight[0]]["exp_avg"])
    for params, o in ((straight, opt), (resumed, again)):
        _grads(params, 2)
        o.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_lowbit_adam_quantizes_large_tensors(eager_compile):
    p = _params((64, 128))
    opt = adam(p, OptimConfig(state="8bit"))
    _grads(p, 0)
    opt.step()
    moment = opt.state[p[0]]["exp_avg"]
    assert type(moment).__name__ == "OptimState8bit"
    ref = _params((64, 128))
    ref_opt = adam(ref, OptimConfig())
    _grads(ref, 0)
    ref_opt.step()
    torch.testing.assert_close(p[0], ref[0], rtol=0, atol=2e-3)  # first step: |update| = lr whatever the moments


def test_missing_torchao_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(optimizers, "_torchao_optim", lambda: None)
    with pytest.raises(ValueError, match=r"optim.state '8bit' needs torchao: pip install 'protfold\[lowbit\]'"):
        adam(_params((3,)), OptimConfig(state="8bit"))
    assert isinstance(adam(_params((3,)), OptimConfig()), torch.optim.Adam)


def test_bad_state_name_is_a_config_error():
    with pytest.raises(ValueError, match="optim.state must be one of fp32, 8bit, 4bit, cpu_offload, got '16bit'"):
        OptimConfig(state="16bit")
    with pytest.raises(ValueError, match="optim.ema_storage must be one of"):
        OptimConfig(ema_storage="fp16")


def test_cpu_offload_on_cpu_is_plain_adam(caplog):
    with caplog.at_level(logging.INFO, logger="protfold.train.optimizers"):
        opt = adam(_params((3,)), OptimConfig(state="cpu_offload"))
    assert type(opt) is torch.optim.Adam and "plain Adam runs" in caplog.text


def _ema_pair(storage: str):
    torch.manual_seed(0)
    ref_model, model = torch.nn.Linear(33, 17), torch.nn.Linear(33, 17)
    model.load_state_dict(ref_model.state_dict())
    return (ref_model, EMA(ref_model, decay=0.9)), (model, EMA(model, decay=0.9, storage=storage))


def test_ema_on_host_equals_fp32_exactly():
    (ref_model, ref), (model, ema) = _ema_pair("cpu")
    for step in range(5):
        for m in (ref_model, model):
            with torch.no_grad():
                m.weight.add_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(step)))
        ref.update()
        ema.update()
    for name in ref.shadow:
        assert torch.equal(ema.shadow[name], ref.shadow[name]), name


def test_ema_bf16_stays_within_one_bf16_step_of_each_fp32_update():
    (_, _), (model, ema) = _ema_pair("bf16")
    assert all(v.dtype == torch.bfloat16 for v in ema.shadow.values())
    start = {k: v.float().clone() for k, v in ema.shadow.items()}
    drift = torch.zeros(())
    for step in range(20):
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=torch.Generator().manual_seed(step)) * 0.01)
        before = {k: v.float() for k, v in ema.shadow.items()}
        ema.update()
        for name, tensor in model.state_dict().items():
            exact = before[name].lerp(tensor.float(), 1 - ema.decay)
            ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
            assert ((ema.shadow[name].float() - exact).abs() <= ulp * 1.0001).all(), name
    for name in start:  # updates far below bf16's resolution still move the average (stochastic rounding)
        drift = drift + (ema.shadow[name].float() - start[name]).abs().sum()
    assert drift > 0


def test_ema_state_dict_round_trip_keeps_storage():
    (_, _), (model, ema) = _ema_pair("bf16")
    ema.update()
    other = EMA(model, decay=0.9, storage="bf16")
    other.load_state_dict(ema.state_dict())
    for name in ema.shadow:
        assert other.shadow[name].dtype == torch.bfloat16 and torch.equal(other.shadow[name], ema.shadow[name])


def _state_tensor(value):
    return value.dequantize() if hasattr(value, "dequantize") and not isinstance(value, torch.nn.Parameter) \
        and type(value) is not torch.Tensor else value


@pytest.mark.parametrize("state,ema", [("8bit", "bf16")])
def test_resume_is_exact_with_each_state_kind(run_kit, tmp_path, eager_compile, state, ema):
    """4 steps straight equal 2 steps (one epoch), a resume from last.ckpt, and 2 more, with quantized moments (c_m 64
    gives tensors of >= 4096 elements, which torchao quantizes) and the EMA stored otherwise."""
    extra = ("--model.optim.state", state, "--model.optim.ema_storage", ema, "--model.model_overrides", "{c_m: 64}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_kit.fit(run_kit.fit_args(straight, steps=4, samples_per_epoch=2, extra=extra))
    run_kit.fit(run_kit.fit_args(resumed, steps=2, samples_per_epoch=2, extra=extra))
    run_kit.fit(run_kit.fit_args(resumed, steps=4, samples_per_epoch=2, extra=extra + ("--ckpt_path", "last")))
    a, b = (run_kit.load(run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt") for root in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 4
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in a["ema"]["shadow"].items():
        assert value.dtype == (torch.bfloat16 if ema == "bf16" else torch.float32)
        torch.testing.assert_close(b["ema"]["shadow"][name], value, rtol=0, atol=1e-6, msg=f"EMA {name}")
    from protfold.train.module import load_module
    from protfold.train.optimizers import decode_optimizer_states

    module = load_module(str(run_kit.version_dirs(resumed)[-1] / "checkpoints" / "last.ckpt"))  # as predict does
    with module.ema.swapped_in():
        for name, value in module.model.state_dict().items():
            if torch.is_floating_point(value):
                assert torch.equal(value, b["ema"]["shadow"][name].float()), f"predict's EMA weight {name}"

    for ckpt in (a, b):
        decode_optimizer_states(ckpt)
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    kinds = {type(v["exp_avg"]).__name__ for v in oa["state"].values()}
    assert {"8bit": "OptimState8bit", "4bit": "OptimState4bit"}[state] in kinds
    for key in oa["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(_state_tensor(ob["state"][key][field]), _state_tensor(oa["state"][key][field]),
                                       rtol=0, atol=1e-6, msg=f"{field} of {key}")
