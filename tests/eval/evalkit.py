"""Shared pieces of the evaluation tests: a tiny byte-level BPE, a tiny Llama LanguageModel, and its
checkpoint.

Test modules load it as a plugin (``pytest_plugins = ["tests.eval.evalkit"]``) for the fixtures
``tiny_tokenizer``, ``tiny_lm`` and ``tiny_run_checkpoint``, and import ``make_lm`` and ``save_checkpoint``.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from bitflow.data.tokenizer import train_tokenizer
from bitflow.lm import LanguageModel

CONTEXT = 16  # the tiny model's max_seq_len: short, so texts longer than the context are cheap


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-entry byte-level BPE trained on a few stdlib modules (deterministic)."""
    docs = [inspect.getsource(m) for m in (json, os, inspect)]
    return train_tokenizer(docs, vocab_size=300)


def make_lm(tokenizer, seed: int = 0, max_seq_len: int = CONTEXT) -> LanguageModel:
    torch.manual_seed(seed)
    lm = LanguageModel(
        model={
            "vocab_size": tokenizer.get_vocab_size(),
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "d_ff": 64,
            "max_seq_len": max_seq_len,
        },
        tokenizer_json=tokenizer.to_str(),
    )
    # a random init predicts almost uniformly; larger weights give sharper, more varied distributions
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    return lm.eval()


@pytest.fixture
def tiny_lm(tiny_tokenizer) -> LanguageModel:
    return make_lm(tiny_tokenizer)


def save_checkpoint(lm: LanguageModel, path: Path, global_step: int = 7) -> Path:
    """Write ``lm`` as Lightning does: state_dict, hyper_parameters, global_step, plus the LanguageModel's own
    ``on_save_checkpoint`` section (tokenizer, model config, quant state)."""
    ckpt = {
        "state_dict": lm.state_dict(),
        "hyper_parameters": dict(lm.hparams),
        "global_step": global_step,
        "epoch": 0,
    }
    lm.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def tiny_run_checkpoint(tiny_lm, tmp_path: Path) -> Path:
    """``<run>/checkpoints/last.ckpt`` with an (empty) ``<run>/tb``, as a bitflow run lays them out."""
    (tmp_path / "run" / "tb").mkdir(parents=True)
    return save_checkpoint(tiny_lm, tmp_path / "run" / "checkpoints" / "last.ckpt")
