"""8-bit AdamW, offloaded optimizer state and the optimizer factory.

Oracles: bitsandbytes' dynamic maps, quantizer and AdamW8bit (CPU), torch.optim.AdamW, and a
brute-force float64 nearest-code rounding.

Trajectory tolerance (toy MLP regression, 200 steps, lr 1e-3, wd 0.01, full-batch loss logged every
step): |loss_ours - loss_ref| / loss_ref < 1% at every step vs torch AdamW (fp32 state) and < 0.5% vs
bitsandbytes AdamW8bit (same 8-bit scheme); final losses within 0.5% of torch AdamW's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from loralab.core.optim import (AdamW8bit, OffloadedOptimizer, build_optimizer, dequantize_blockwise,
                                dynamic_map, quantize_blockwise)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional


def _toy_problem(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(512, 32)
    y = torch.sin(x @ torch.randn(32, 1)) + 0.1 * torch.randn(512, 1)
    net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
    return x, y, net


def _train(make_optimizer, steps: int = 200, seed: int = 0) -> list[float]:
    x, y, net = _toy_problem(seed)
    opt = make_optimizer(net.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=gen)
        loss = nn.functional.mse_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(net(x), y).item())
    return losses


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    assert torch.equal(dynamic_map(signed), bnb_functional.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_nearest_code_and_absmax_per_block(signed):
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-4, 1, 1000)  # 3 full blocks + a short one, wide range
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, signed, block_size=256)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,) and absmax.shape == (4,)
    padded = torch.nn.functional.pad(x, (0, 24)).view(4, 256)
    torch.testing.assert_close(absmax, padded.abs().amax(1), rtol=0, atol=0)
    normalized = (padded / absmax[:, None]).view(-1)[:1000].double()
    code_map = dynamic_map(signed).double()
    best = (normalized[:, None] - code_map[None, :]).abs().min(1).values
    ours = (normalized - code_map[codes.long()]).abs()
    assert torch.all(ours <= best + 1e-7)  # nearest entry (ties may go either way)
    back = dequantize_blockwise(codes, absmax, signed, 256)
    torch.testing.assert_close(back, code_map[codes.long()].float() * absmax.repeat_interleave(256)[:1000])
    # bitsandbytes' own blockwise quantizer: same absmax, and ours is never a worse approximation
    q_bnb, state = bnb_functional.quantize_blockwise(x, code=bnb_functional.create_dynamic_map(signed),
                                                       blocksize=256)
    torch.testing.assert_close(state.absmax, absmax)
    assert (codes == q_bnb.view(-1)).float().mean() > 0.95
    err_bnb = (bnb_functional.dequantize_blockwise(q_bnb, state).view(-1) - x).abs().sum()
    assert (back - x).abs().sum() <= err_bnb * (1 + 1e-5)


def test_zero_block_dequantizes_to_zero():
    codes, absmax = quantize_blockwise(torch.zeros(300), signed=True)
    assert torch.equal(dequantize_blockwise(codes, absmax, True), torch.zeros(300))


def test_small_tensors_keep_fp32_state_large_ones_8bit():
    big, small = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64))
    opt = AdamW8bit([big, small], lr=1e-3, min_8bit_size=4096)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert opt.state[big]["exp_avg_absmax"].shape == (4096 // 256,)
    assert opt.state[small]["exp_avg"].dtype == torch.float32


def test_first_step_equals_torch_adamw_and_second_uses_quantized_moments():
    """Step 1 updates with the unquantized moments, so it equals AdamW; step 2 must use the dequantized
    moments of step 1. Reference in float64 with bitsandbytes' quantizer as the rounding oracle."""
    torch.manual_seed(0)
    w0 = torch.randn(32, 256)
    g1, g2 = torch.randn(32, 256), torch.randn(32, 256) * 0.5
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    ours = nn.Parameter(w0.clone())
    opt = AdamW8bit([ours], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = nn.Parameter(w0.clone())
    ref_opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    ours.grad, ref.grad = g1.clone(), g1.clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(ours.data, ref.data, rtol=0, atol=1e-6)

    def roundtrip(t, signed):  # nearest entry of bnb's map, brute force in float64, absmax per 256
        code_map = bnb_functional.create_dynamic_map(signed).double()
        blocks = t.double().reshape(-1, 256)
        absmax = blocks.abs().amax(1, keepdim=True)
        nearest = (blocks[..., None] / absmax[..., None] - code_map).abs().argmin(-1)
        return (code_map[nearest] * absmax).reshape(t.shape)

    w, g1d, g2d = w0.double(), g1.double(), g2.double()
    m1, v1 = (1 - b1) * g1d, (1 - b2) * g1d ** 2
    w = w * (1 - lr * wd) - lr / (1 - b1) * m1 / (v1.sqrt() / (1 - b2) ** 0.5 + eps)
    m2 = b1 * roundtrip(m1, True) + (1 - b1) * g2d
    v2 = b2 * roundtrip(v1, False) + (1 - b2) * g2d ** 2
    w = w * (1 - lr * wd) - lr / (1 - b1 ** 2) * m2 / (v2.sqrt() / (1 - b2 ** 2) ** 0.5 + eps)
    ours.grad = g2.clone()
    opt.step()
    # fp32 vs float64 rounding can flip an exact tie between two codes: allow rare outliers
    close = torch.isclose(ours.data.double(), w, rtol=0, atol=1e-6)
    assert close.float().mean() > 0.999, close.float().mean()
    torch.testing.assert_close(ours.data.double(), w, rtol=0, atol=lr * 0.05)


def test_loss_trajectory_tracks_torch_adamw_and_bitsandbytes():
    kwargs = dict(lr=1e-3, weight_decay=0.01)
    ref = torch.tensor(_train(lambda p: torch.optim.AdamW(p, **kwargs)))
    ours = torch.tensor(_train(lambda p: AdamW8bit(p, **kwargs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch.tensor(_train(lambda p: bnb.optim.AdamW8bit(p, **kwargs)))
    assert ref[-1] < 0.5 * ref[0]  # the problem actually trains
    assert torch.all((ours - ref).abs() / ref < 0.01), ((ours - ref).abs() / ref).max()
    assert torch.all((ours - peer).abs() / peer < 0.005), ((ours - peer).abs() / peer).max()
    assert abs(ours[-1] - ref[-1]) / ref[-1] < 0.005


def test_bf16_params_keep_fp32_state_and_update():
    p = nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    before = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-2, min_8bit_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)
    assert opt.state[p]["exp_avg_absmax"].dtype == torch.float32


@pytest.mark.parametrize("cls", [AdamW8bit, torch.optim.AdamW])
@pytest.mark.parametrize("offloaded", [False, True])
def test_state_dict_round_trip_gives_identical_next_steps(cls, offloaded):
    def make(params):
        kw = dict(lr=1e-2, weight_decay=0.1)
        return OffloadedOptimizer(cls, params, **kw) if offloaded else cls(params, **kw)

    x, y, net = _toy_problem()
    opt = make(net.parameters())

    def step(model, optimizer, i):
        loss = nn.functional.mse_loss(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(net, opt, i)
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    for i in range(3, 6):
        step(net, opt, i)
    _, _, resumed = _toy_problem(seed=123)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = make(resumed.parameters())
    resumed_opt.load_state_dict(saved_opt)
    for key, value in opt.state[next(iter(net.parameters()))].items():
        if torch.is_tensor(value):
            assert resumed_opt.state[next(iter(resumed.parameters()))][key].dtype == value.dtype, key
    for i in range(3, 6):
        step(resumed, resumed_opt, i)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [AdamW8bit, torch.optim.AdamW])
def test_offloaded_on_cpu_equals_plain_optimizer(cls):
    plain = torch.tensor(_train(lambda p: cls(p, lr=1e-3, weight_decay=0.01), steps=30))
    offl = torch.tensor(_train(lambda p: OffloadedOptimizer(cls, p, lr=1e-3, weight_decay=0.01), steps=30))
    assert torch.equal(plain, offl)


def test_offloaded_works_with_lr_scheduler():
    p = nn.Parameter(torch.randn(8, 8))
    opt = OffloadedOptimizer(torch.optim.AdamW, [p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [AdamW8bit, torch.optim.AdamW])
def test_offloaded_on_gpu_equals_plain_and_state_rests_on_host(cls):
    def run(offloaded):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 1)).cuda()
        groups = [{"params": [net[0].weight, net[2].weight]}, {"params": [net[0].bias, net[2].bias],
                                                                 "weight_decay": 0.0}]
        kw = dict(lr=1e-3, weight_decay=0.01)
        opt = OffloadedOptimizer(cls, groups, **kw) if offloaded else cls(groups, **kw)
        x = torch.randn(256, 64, device="cuda")
        for _ in range(20):
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net, opt

    plain_net, _ = run(False)
    off_net, off_opt = run(True)
    for a, b in zip(plain_net.parameters(), off_net.parameters()):
        assert torch.equal(a, b)
    for state in off_opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device.type == "cpu" and value.is_pinned()


def test_build_optimizer_groups_and_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                   id(model[1].bias), id(model[2].bias)}
    assert isinstance(build_optimizer(model, "adamw8bit"), AdamW8bit)
    paged = build_optimizer(model, "paged_adamw8bit", betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(paged, OffloadedOptimizer) and isinstance(paged.inner, AdamW8bit)
    assert paged.param_groups[0]["betas"] == (0.8, 0.9) and paged.param_groups[0]["eps"] == 1e-6
    assert isinstance(build_optimizer(model.parameters(), "paged_adamw").inner, torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(model, "sgd")
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), "adamw")
