"""to_bitlinear / to_linear on a toy Llama-shaped module (names as bitflow.models.llama, built here)."""

import pytest
import torch
import torch.nn as nn

from bitflow.quant import BitLinear, get_strength, to_bitlinear, to_linear

ALL_BUT_HEAD = [
    f"layers.{i}.{name}"
    for i in range(2)
    for name in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")
]


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.wo(self.wq(x) * torch.sigmoid(self.wk(x)) + self.wv(x))


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w2, self.w3 = (
            nn.Linear(d, f, bias=False),
            nn.Linear(f, d, bias=False),
            nn.Linear(d, f, bias=False),
        )

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn, self.mlp = Attn(d), Mlp(d, f)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ToyLlama(nn.Module):
    def __init__(self, vocab=11, d=8, f=12, n_layers=2, tie=False):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, f) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _ids(model):
    return {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}


def test_converts_all_linear_but_lm_head_keeping_parameter_ids():
    torch.manual_seed(0)
    model = ToyLlama()
    before = _ids(model)
    opt = torch.optim.AdamW(model.parameters())
    names = to_bitlinear(model, weight_scale="absmedian")
    assert names == ALL_BUT_HEAD
    assert _ids(model) == before
    converted = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert converted == set(ALL_BUT_HEAD)
    assert type(model.lm_head) is nn.Linear
    assert all(m.weight_scale == "absmedian" for m in model.modules() if isinstance(m, BitLinear))
    assert get_strength(model) == {"weight": 1.0, "act": 1.0}
    # the optimizer built before the switch still owns exactly the model's parameters
    assert {id(p) for g in opt.param_groups for p in g["params"]} == set(before.values())
    loss = model(torch.randint(0, 11, (2, 5))).square().mean()
    loss.backward()
    opt.step()


def test_include_exclude_patterns():
    assert to_bitlinear(ToyLlama(), include=["mlp.*"]) == [n for n in ALL_BUT_HEAD if ".mlp." in n]
    assert to_bitlinear(ToyLlama(), include=["layers.*.attn.wq", "layers.1.mlp.w2"]) == [
        "layers.0.attn.wq",
        "layers.1.attn.wq",
        "layers.1.mlp.w2",
    ]
    assert to_bitlinear(ToyLlama(), include="layers.0.attn.wq") == ["layers.0.attn.wq"]
    assert to_bitlinear(ToyLlama(), exclude=["lm_head", "wo"]) == [
        n for n in ALL_BUT_HEAD if not n.endswith("wo")
    ]
    assert to_bitlinear(ToyLlama(), exclude=None) == ALL_BUT_HEAD + ["lm_head"]
    # "lm_head" also excludes a nested "model.lm_head"
    wrapper = nn.Module()
    wrapper.model = ToyLlama()
    assert to_bitlinear(wrapper) == ["model." + n for n in ALL_BUT_HEAD]
    # a second call finds nothing left to convert
    with pytest.raises(ValueError, match="already BitLinear"):
        to_bitlinear(wrapper)


def test_filter_matching_nothing_raises_and_leaves_model_unchanged():
    model = ToyLlama()
    with pytest.raises(
        ValueError, match=r"include=\['attention\.\*'\].*available.*layers\.0\.attn\.wq"
    ):
        to_bitlinear(model, include=["attention.*"])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        to_bitlinear(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="granularity='rows'"):
        to_bitlinear(model, granularity="rows")
    with pytest.raises(ValueError, match="group_size=3 does not divide in_features=8"):
        to_bitlinear(model, granularity="group", group_size=3)
    with pytest.raises(ValueError, match="unknown BitLinear option"):
        to_bitlinear(model, weight_bit=4)
    assert not any(isinstance(m, BitLinear) for m in model.modules())


def test_round_trip_to_linear_restores_plain_model():
    torch.manual_seed(0)
    model = ToyLlama()
    idx = torch.randint(0, 11, (2, 5))
    ref = model(idx)
    before = _ids(model)
    to_bitlinear(model)
    assert not torch.equal(model(idx), ref)
    assert to_linear(model) == ALL_BUT_HEAD
    assert _ids(model) == before
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in ALL_BUT_HEAD)
    assert torch.equal(model(idx), ref)
    with pytest.raises(ValueError, match="no BitLinear"):
        to_linear(model)


def test_tied_lm_head_stays_tied():
    model = ToyLlama(tie=True)
    assert model.lm_head.weight is model.tok_emb.weight
    names = to_bitlinear(model, exclude=())
    assert names[-1] == "lm_head"
    assert isinstance(model.lm_head, BitLinear)
    assert model.lm_head.weight is model.tok_emb.weight
    model(torch.randint(0, 11, (1, 4))).sum().backward()
    assert model.tok_emb.weight.grad is not None
    to_linear(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.tok_emb.weight


def test_shared_module_is_replaced_in_every_slot():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert to_bitlinear(model) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], BitLinear)
    assert model[0].weight is shared.weight
