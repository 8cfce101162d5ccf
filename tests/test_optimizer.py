"""AdamW as bitflow builds it (bitflow.quant.recipe.adamw): torch's fused kernel where torch has one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bitflow.lm import LanguageModel, param_groups
from bitflow.quant.recipe import adamw, fused_adamw_supported
from tests.helpers import TINY_MODEL, tiny_llama


def test_the_default_optimizer_is_fused_adamw_on_the_cpu():
    lm = LanguageModel(TINY_MODEL)
    opt = lm.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is True and all(g["fused"] is True for g in opt.param_groups)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert not opt._step_supports_amp_scaling  # a GradScaler unscales its gradients first, so clipping works


def test_fused_false_and_foreach_keep_torch_s_choice():
    model = tiny_llama()
    assert not adamw(model, param_groups(model, 0.1), fused=False).defaults["fused"]
    opt = adamw(model, param_groups(model, 0.1), foreach=True)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert LanguageModel(TINY_MODEL, optimizer={"fused": False}).configure_optimizers()["optimizer"].defaults[
        "fused"
    ] is False
    assert not fused_adamw_supported([{"params": [torch.zeros(2, dtype=torch.int64)]}])


def test_fused_steps_follow_the_reference_adamw():
    torch.manual_seed(0)
    models = [tiny_llama(), tiny_llama()]
    opts = [adamw(m, param_groups(m, 0.1), lr=1e-2, fused=f) for m, f in zip(models, (None, False), strict=True)]
    batch = torch.randint(0, TINY_MODEL["vocab_size"], (2, 9))
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_adamw_trains_under_a_grad_scaler_with_gradient_clipping(tmp_path):
    # 16-mixed has a GradScaler: Lightning refuses to clip for an optimizer that unscales inside its step
    batches = DataLoader(torch.randint(0, TINY_MODEL["vocab_size"], (8, 17)), batch_size=4)
    lm = LanguageModel(TINY_MODEL)
    trainer = L.Trainer(
        accelerator="cpu", precision="16-mixed", max_steps=2, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(lm, train_dataloaders=batches)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True


def test_clip_grad_norm_is_torchs_norm_clipping_over_all_gradients():
    """bitflow.models.clip_grad_norm (used when FSDP2-sharded and plain DQT gradients meet) scales by
    max_norm / (norm + 1e-6) when the joint norm is larger, as torch.nn.utils.clip_grad_norm_ does."""
    from bitflow.models import clip_grad_norm, grad_norm

    a, b = torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]], dtype=torch.float64)  # joint norm 5
    assert float(grad_norm([a, b])) == pytest.approx(5.0)
    norm = clip_grad_norm([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert a.tolist() == pytest.approx([3.0 / (5.0 + 1e-6), 0.0]) and b[1, 0].item() == pytest.approx(4.0 / (5.0 + 1e-6))
    c = torch.tensor([0.3, 0.4])
    clip_grad_norm([c], 1.0)  # norm 0.5 <= 1: unchanged
    assert c.tolist() == pytest.approx([0.3, 0.4])
