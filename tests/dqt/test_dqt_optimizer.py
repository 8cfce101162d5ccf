"""DQTAdamW: AdamW's update on the stored weights, rounded back stochastically (Zhao et al., arXiv 2412.04787)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bitflow.lm import param_groups
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant.dqt import (
    DQTAdamW,
    DQTLinear,
    dqt_modules,
    stochastic_round_bf16,
    to_dqt,
)


def tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16))


def train_step(model: Llama, opt: torch.optim.Optimizer, x: torch.Tensor, clip: float | None = None) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    if clip is not None:  # as Lightning clips: over every tensor of every param group
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def layer_with_grad(codes: list[list[int]], scale: float, grad: list[list[float]], bits: int | None = None,
                    scale_update: str = "max") -> DQTLinear:
    """A DQTLinear holding ``codes * scale`` whose float leaf carries ``grad`` (as after a backward)."""
    c = torch.tensor(codes, dtype=torch.int8)
    layer = DQTLinear(c.shape[1], c.shape[0], bias=False, bits=bits, scale_update=scale_update)
    layer.codes.copy_(c)
    layer.scale.fill_(scale)
    leaf = layer._forward_weight(torch.float32)
    leaf.grad = torch.tensor(grad, dtype=torch.float32)
    return layer


@pytest.mark.parametrize("bits", [None, 3, 8])
def test_every_weight_is_on_the_grid_after_every_step(bits):
    model = tiny()
    to_dqt(model, bits=bits)
    opt = DQTAdamW.for_model(model, param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), **{"seed": 0})
    assert isinstance(opt, DQTAdamW)
    qn, qp = (-1, 1) if bits is None else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    before = {name: m.codes.clone() for name, m in dqt_modules(model)}
    x = torch.randint(0, 48, (4, 12))
    for _ in range(2):
        train_step(model, opt, x, clip=1.0)
        for name, m in dqt_modules(model):
            assert m.codes.dtype == torch.int8 and m.scale.dtype == torch.float32
            assert qn <= int(m.codes.min()) and int(m.codes.max()) <= qp, name
            assert torch.equal(m.weight, m.codes.float() * m.scale)
            assert m._slot.leaf is None  # the float copy did not outlive the step
        assert opt._dqt_group["params"] == []
    assert any(not torch.equal(before[name], m.codes) for name, m in dqt_modules(model))  # it trains
    assert sum(int(v) for v in opt.last_flips.values()) > 0


def test_one_step_by_hand_and_the_rounding_is_unbiased():
    n = 20000  # rows of the same 4 weights: the column means estimate E[code]
    layer = layer_with_grad([[1, 0, -1, 0]] * n, 0.5, [[1.0, -1.0, 1.0, 0.0]] * n)
    opt = DQTAdamW([], [("l", layer)], lr=0.25, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1, seed=0)
    opt.step()
    # first AdamW step: m^ = g, v^ = g^2, so the update is sign(g) (0 for g = 0).
    # W' = W (1 - 0.25 * 0.1) - 0.25 sign(g) = [0.2375, 0.25, -0.7375, 0]; max(codes) = Qp, so the scale stays 0.5
    # x = W' / 0.5 = [0.475, 0.5, -1.475 -> clipped to -1, 0]
    assert float(layer.scale) == 0.5
    codes = layer.codes.float()
    assert set(codes[:, 0].unique().tolist()) == {0.0, 1.0} and set(codes[:, 1].unique().tolist()) == {0.0, 1.0}
    assert codes[:, 2].eq(-1).all() and codes[:, 3].eq(0).all()
    mean = codes.mean(0)
    for col, p in ((0, 0.475), (1, 0.5)):
        tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 standard deviations of a mean of n Bernoulli(p)
        assert abs(float(mean[col]) - p) < tol, (col, float(mean[col]), p, tol)
        # round-to-nearest is not unbiased: 0.475 -> 0 and 0.5 -> 0 (ties to even) for every weight
        assert abs(round(p) - p) > 10 * tol or round(p) == 0


def test_bf16_moment_rounding_is_unbiased():
    x = torch.full((50000,), 1.0 + 2.0**-10)  # between the bf16 neighbours 1 and 1 + 2^-7, 1/8 of the way
    gen = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, gen)
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    p = 1 / 8
    tol = 5 * 2.0**-7 * math.sqrt(p * (1 - p) / x.numel())
    assert abs(float(r.float().mean()) - float(x[0])) < tol
    assert abs(float(x.to(torch.bfloat16).float().mean()) - float(x[0])) > 10 * tol  # round-to-nearest is biased


def test_scale_follows_the_authors_max_rule():
    # 4 bits (Qp = 7), max code 5: scale' = 0.7 * 5 / 7 = 0.5; zero gradient, no decay: W' = W, x = codes * 1.4
    for rule, scale in (("max", 0.5), ("fixed", 0.7)):
        layer = layer_with_grad([[5, -3, 2, 0]], 0.7, [[0.0] * 4], bits=4, scale_update=rule)
        opt = DQTAdamW([], [("l", layer)], lr=0.1, weight_decay=0.0, seed=0)
        opt.step()
        assert float(layer.scale) == pytest.approx(scale)
        if rule == "fixed":
            assert layer.codes.tolist() == [[5, -3, 2, 0]]
        else:  # [7, -4.2, 2.8, 0]: 7 and 0 exactly, the others one of their two neighbours
            c = layer.codes.tolist()[0]
            assert c[0] == 7 and c[1] in (-5, -4) and c[2] in (2, 3) and c[3] == 0


def test_a_fine_grid_gives_the_plain_adamw_step_within_one_grid_step():
    torch.manual_seed(1)
    codes = torch.randint(-100, 101, (64, 32), dtype=torch.int8)
    scale = 1e-4
    grad = torch.randn(64, 32)
    layer = layer_with_grad(codes.tolist(), scale, grad.tolist(), bits=8, scale_update="fixed")
    ref = torch.nn.Parameter(codes.float() * scale)
    ref.grad = grad.clone()
    kw = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    DQTAdamW([], [("l", layer)], seed=0, **kw).step()
    torch.optim.AdamW([ref], **kw).step()
    moved = (ref.detach() - codes.float() * scale).abs()
    assert moved.min() > 5 * scale  # the update spans many grid steps (the comparison is not trivial)
    err = (layer.weight - ref.detach()).abs()
    assert float(err.max()) < scale * (1 + 1e-3)  # within one grid step, as stochastic rounding allows
    assert float(err.mean()) < 0.4 * scale


def test_gradient_clipping_over_the_param_groups_covers_the_dqt_gradients():
    model = tiny()
    to_dqt(model)
    opt = DQTAdamW.for_model(model, param_groups(model, 0.1), lr=1e-3, **{"seed": 0})
    x = torch.randint(0, 48, (4, 12))
    model(x[:, :-1]).float().pow(2).mean().backward()
    leaves = [m._slot.leaf for _, m in dqt_modules(model)]
    assert opt._dqt_group["params"] == leaves  # the forward put the leaves into the "dqt" group
    everything = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in everything))
    dqt_before = leaves[0].grad.clone()
    total = torch.nn.utils.clip_grad_norm_(everything, max_norm=float(norm) / 4)
    assert float(total) == pytest.approx(float(norm), rel=1e-4)
    assert torch.allclose(leaves[0].grad, dqt_before / 4, rtol=1e-3)


def test_state_dict_round_trip_continues_exactly_including_the_rounding_noise():
    x = torch.randint(0, 48, (4, 12))
    model = tiny()
    to_dqt(model, bits=4)
    opt = DQTAdamW.for_model(model, param_groups(model, 0.1), lr=3e-3, **{"seed": 5, "moment_dtype": "bfloat16"})
    for _ in range(2):
        train_step(model, opt, x)
    twin = copy.deepcopy(model)
    twin_opt = DQTAdamW.for_model(twin, param_groups(twin, 0.1), lr=3e-3, **{"seed": 999, "moment_dtype": "bfloat16"})
    sd = opt.state_dict()
    assert set(sd["dqt"]["state"]) == {name for name, _ in dqt_modules(model)}
    assert sd["dqt"]["state"]["layers.0.attn.wq"]["exp_avg"].dtype == torch.bfloat16
    twin_opt.load_state_dict(copy.deepcopy(sd))
    for _ in range(2):
        train_step(model, opt, x)
        train_step(twin, twin_opt, x)
    for (name, a), (_, b) in zip(dqt_modules(model), dqt_modules(twin)):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), name
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_unused_layers_are_left_alone():
    layer = DQTLinear(4, 2, bits=None)
    layer.codes.fill_(1)
    opt = DQTAdamW([], [("l", layer)], lr=1.0, seed=0)
    opt.step()  # no forward, no gradient
    assert layer.codes.eq(1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(amsgrad=True), "amsgrad"),
        (dict(moment_dtype="fp8"), "moment_dtype='fp8' is not supported; allowed: float32, bfloat16"),
        (dict(seed="x"), "seed='x'"),
    ],
)
def test_bad_optimizer_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQTAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
