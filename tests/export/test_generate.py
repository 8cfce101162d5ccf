"""bitflow-generate and the KV cache: cached logits equal uncached ones, sampling filters, the command."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from bitflow.config import ConfigError
from bitflow.generate import filter_logits, generate_tokens, run_generate, sample_next
from tests.export.conftest import write_checkpoint
from tests.helpers import tiny_llama


@pytest.mark.parametrize("ternary", [False, True])
def test_cached_logits_equal_an_uncached_forward_at_every_step(ternary: bool):
    model = tiny_llama(n_kv_heads=1).eval()
    if ternary:  # per-token activation quantization: a position's output does not depend on the others
        from bitflow.quant import to_bitlinear

        to_bitlinear(model, exclude=["lm_head"])
    prompts = torch.randint(1, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    tokens = list(generate_tokens(model, prompts, 12, logits_hook=seen.append))
    seq = torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1)
    with torch.no_grad():
        full = model(seq)
    for step, logits in enumerate(seen):
        torch.testing.assert_close(logits, full[:, 6 + step], atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens[step], full[:, 6 + step].argmax(-1))


def test_past_the_context_the_window_slides_as_an_uncached_model_reading_the_last_tokens():
    model = tiny_llama().eval()  # max_seq_len 64
    prompt = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    tokens = list(generate_tokens(model, prompt, 10, logits_hook=seen.append, slide=True))
    seq = torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)
    with torch.no_grad():
        for step, logits in enumerate(seen):
            end = 60 + step
            window = seq[:, max(0, end - 64) : end]
            torch.testing.assert_close(logits, model(window)[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="70 tokens, more than the model's context of 64"):
        next(generate_tokens(model, torch.ones(1, 70, dtype=torch.long), 1))


def test_top_k_and_top_p_keep_the_tokens_the_definitions_keep():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # top_p=0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too (the smallest set with mass >= 0.8)
    assert keep(filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 0
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    draws = [sample_next(logits.expand(64, 5), 1.0, generator=g()).tolist() for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1  # seeded, and really sampling


def test_bitflow_generate_streams_greedy_text_and_refuses_a_too_long_prompt(tokenizer, tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", tokenizer, quant={"recipe": "bitlinear"})
    out = io.StringIO()
    text = run_generate(
        {"ckpt": str(ckpt), "prompt": "def add(a, b):", "max_new_tokens": 8, "temperature": 0}, out=out
    )
    assert out.getvalue() == text + "\n"
    from bitflow.export.source import load_source

    source = load_source(ckpt)
    ids = source.tokenizer.encode("def add(a, b):").ids
    expected = [int(t) for t in generate_tokens(source.decoder, [ids], 8)]
    eos = source.tokenizer.token_to_id("<|endoftext|>")
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert text == source.tokenizer.decode(expected, skip_special_tokens=False)
    packed = {"ckpt": str(ckpt), "prompt": "def add(a, b):", "max_new_tokens": 8, "temperature": 0, "packed": True}
    assert run_generate(packed, out=io.StringIO()) == text  # 2-bit codes in memory, the same greedy text
    with pytest.raises(ConfigError, match=r"prompt=.*at most the model's context of 64 tokens"):
        run_generate({"ckpt": str(ckpt), "prompt": "x = 1\n" * 60}, out=io.StringIO())
    with pytest.raises(ConfigError, match=r"top_p=1.5"):
        run_generate({"ckpt": str(ckpt), "top_p": 1.5}, out=io.StringIO())


def test_generation_stops_at_eos(tokenizer, tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", tokenizer)
    data = torch.load(ckpt, weights_only=False)
    data["state_dict"]["model.norm.weight"].zero_()  # every logit 0: the argmax is token 0, <|endoftext|>
    torch.save(data, ckpt)
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    out = io.StringIO()
    assert run_generate({"ckpt": str(ckpt), "prompt": "x", "temperature": 0, "max_new_tokens": 20}, out=out) == ""
    assert out.getvalue() == "\n"
