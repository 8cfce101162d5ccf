"""Checkpoints for the export tests: a tiny LanguageModel (16-bit or ternary) with a small byte-level BPE, written
through the module's own checkpoint hook (no Trainer needed), and a fast checkpoint-free tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from bitflow.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=320)


def write_checkpoint(path: Path, tokenizer, quant: dict | None = None, seed: int = 0, **fields) -> Path:
    """A bitflow checkpoint of a tiny model with random weights (``quant``: converted to that recipe)."""
    from bitflow.lm import LanguageModel

    torch.manual_seed(seed)
    model = {**TINY_MODEL, "vocab_size": tokenizer.get_vocab_size(), **fields}
    lm = LanguageModel(model=model, tokenizer_json=tokenizer.to_str(), quant=quant)
    with torch.no_grad():  # norm gains away from 1, so a misplaced gain shows
        for p in lm.model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if quant is not None:
        lm.quant_recipe.convert(lm.model)
    ckpt = {"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "global_step": 0}
    lm.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory, tokenizer) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "dense.ckpt", tokenizer, n_kv_heads=1)


@pytest.fixture(scope="session")
def ternary_ckpt(tmp_path_factory, tokenizer) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ternary.ckpt", tokenizer, quant={"recipe": "bitlinear"}, seed=1
    )
