"""The lm-eval adapter (model ``bitflow``): log-likelihoods against direct computations with the model,
rolling windows, greedy generation, checkpoints (16-bit and ternary), lm-eval's registry, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from bitflow.eval.harness import BitflowLM
from bitflow.eval.suites import task_manager_for
from tests.eval.evalkit import CONTEXT, make_lm, save_checkpoint

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logprobs(lm_module, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[j+1] | tokens[:j+1]) for every j, from one forward pass (the sequence must fit the
    context)."""
    logits = lm_module.model(torch.tensor([tokens[:-1]]))[0]
    logp = F.log_softmax(logits.double(), dim=-1)
    return logp.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def _greedy_ids(lm_module, tokens: list[int]) -> list[int]:
    logits = lm_module.model(torch.tensor([tokens[:-1]]))[0]
    return logits.argmax(dim=-1).tolist()


PAIRS = [
    ("def f(x):", " return x"),
    ("import os\n", "import sys"),
    ("class A:\n    pass", "\n"),
    ("x = ", "[1, 2, 3]"),
]


def test_loglikelihood_equals_the_sum_of_continuation_log_probs(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, batch_size=3)
    got = adapter.loglikelihood(_requests("loglikelihood", PAIRS))
    for (ctx, cont), (score, greedy) in zip(PAIRS, got, strict=True):
        # lm-eval moves the context's trailing whitespace into the continuation, then splits the encoding
        n_space = len(ctx) - len(ctx.rstrip())
        ctx, cont = ctx[: len(ctx) - n_space], ctx[len(ctx) - n_space :] + cont
        ctx_ids = tiny_tokenizer.encode(ctx).ids
        cont_ids = tiny_tokenizer.encode(ctx + cont).ids[len(ctx_ids) :]
        tokens = ctx_ids + cont_ids
        assert len(tokens) <= CONTEXT + 1
        logp = _logprobs(tiny_lm, tokens)
        assert score == pytest.approx(logp[-len(cont_ids) :].sum().item(), abs=1e-4)
        predicted = _greedy_ids(tiny_lm, tokens)[-len(cont_ids) :]
        assert greedy == (predicted == cont_ids)


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer)
    context = tiny_tokenizer.encode("def main():\n    ").ids
    tokens = list(context)
    for _ in range(3):
        tokens.append(int(tiny_lm.model(torch.tensor([tokens]))[0, -1].argmax()))
    greedy_cont = tokens[len(context) :]
    other = greedy_cont[:2] + [(greedy_cont[2] + 1) % tiny_tokenizer.get_vocab_size()]
    (score, is_greedy), (_, not_greedy) = adapter._loglikelihood_tokens(
        [(("", ""), context, greedy_cont), (("", ""), context, other)]
    )
    assert is_greedy is True and not_greedy is False
    assert score == pytest.approx(_logprobs(tiny_lm, tokens)[-3:].sum().item(), abs=1e-4)


def test_long_contexts_are_cut_from_the_left(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer)
    ctx = list(range(40, 40 + 3 * CONTEXT))  # 48 tokens of context, 16 of model context
    cont = [7, 8, 9]
    ((score, _),) = adapter._loglikelihood_tokens([(("", ""), ctx, cont)])
    window = (ctx + cont)[-(CONTEXT + 1) :]  # the model reads the last 16 tokens before the final one
    assert score == pytest.approx(_logprobs(tiny_lm, window)[-3:].sum().item(), abs=1e-4)


def test_batching_and_order_do_not_change_the_results(tiny_lm, tiny_tokenizer):
    reqs = _requests("loglikelihood", PAIRS * 2 + [("a", "b" * 40)])
    one = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, batch_size=1).loglikelihood(reqs)
    many = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, batch_size=16).loglikelihood(reqs)
    assert [s for s, _ in one] == pytest.approx([s for s, _ in many], abs=1e-4)
    assert [g for _, g in one] == [g for _, g in many]
    assert one[0] == pytest.approx(one[len(PAIRS)], abs=1e-6)  # a repeated request gets the same answer


def test_empty_context_conditions_on_endoftext(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer)
    ((score, _),) = adapter.loglikelihood(_requests("loglikelihood", [("", "import os")]))
    tokens = [adapter.eot_token_id] + tiny_tokenizer.encode("import os").ids
    assert score == pytest.approx(_logprobs(tiny_lm, tokens).sum().item(), abs=1e-4)


def test_rolling_loglikelihood_of_a_long_text_is_the_sum_over_its_windows(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer)
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 2
    ids = tiny_tokenizer.encode(text).ids
    assert len(ids) > 3 * CONTEXT
    stream = [adapter.eot_token_id] + ids
    # disjoint chunks of 16 predicted tokens, the last one with a full 16-token context
    want, a = 0.0, 1
    while a < len(stream):
        b = min(len(stream), a + CONTEXT)
        start = max(0, b - 1 - CONTEXT)
        logp = _logprobs(tiny_lm, stream[start:b])
        want += logp[-(b - a) :].sum().item()
        a = b
    (got,) = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(want, abs=1e-3)
    # a text that fits the context is one forward pass
    short = "x = 1\n"
    (got_short,) = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,)]))
    tokens = [adapter.eot_token_id] + tiny_tokenizer.encode(short).ids
    assert got_short == pytest.approx(_logprobs(tiny_lm, tokens).sum().item(), abs=1e-4)


def _manual_greedy(lm_module, ids: list[int], n: int, eot: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(lm_module.model(torch.tensor([(ids + out)[-CONTEXT:]]))[0, -1].argmax())
        if nxt == eot:
            break
        out.append(nxt)
    return out


def test_generate_until_is_greedy_and_stops_at_the_stop_sequence(tiny_lm, tiny_tokenizer):
    adapter = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, batch_size=2)
    contexts = ["def f(x):\n", "import "]
    full = adapter.generate_until(
        _requests("generate_until", [(c, {"until": [], "max_gen_toks": 20}) for c in contexts])
    )
    for ctx, text in zip(contexts, full, strict=True):
        want = _manual_greedy(tiny_lm, tiny_tokenizer.encode(ctx).ids, 20, adapter.eot_token_id)
        assert text == tiny_tokenizer.decode(want)
    text = full[0]
    assert len(text) >= 4
    stop = text[len(text) // 2]
    (cut,) = adapter.generate_until(
        _requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 20})])
    )
    assert cut == text[: text.index(stop)]
    (short,) = adapter.generate_until(
        _requests("generate_until", [(contexts[0], {"until": [], "max_gen_toks": 2})])
    )
    assert short == tiny_tokenizer.decode(
        _manual_greedy(tiny_lm, tiny_tokenizer.encode(contexts[0]).ids, 2, adapter.eot_token_id)
    )


def test_checkpoint_restores_the_same_model(tiny_lm, tiny_tokenizer, tiny_run_checkpoint):
    in_memory = BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer).loglikelihood(
        _requests("loglikelihood", PAIRS)
    )
    loaded = BitflowLM(ckpt=str(tiny_run_checkpoint), device="cpu").loglikelihood(
        _requests("loglikelihood", PAIRS)
    )
    assert [s for s, _ in loaded] == pytest.approx([s for s, _ in in_memory], abs=1e-5)


def test_ternary_checkpoint_restores_the_quantization_state(tiny_tokenizer, tmp_path: Path):
    from bitflow.quant.recipes import recipe_from_config

    lm16 = make_lm(tiny_tokenizer, seed=1)
    fp16 = BitflowLM(model=lm16, tokenizer=tiny_tokenizer).loglikelihood(_requests("loglikelihood", PAIRS))
    lm16.quant_recipe = recipe_from_config({"recipe": "bitlinear"})
    names = lm16.quant_recipe.convert(lm16.model).names
    assert names and "lm_head" not in names
    ternary = BitflowLM(model=lm16, tokenizer=tiny_tokenizer).loglikelihood(_requests("loglikelihood", PAIRS))
    path = save_checkpoint(lm16, tmp_path / "ternary.ckpt")
    loaded = BitflowLM(ckpt=str(path), device="cpu")
    assert loaded.get_model_info()["quantized"] is True
    got = loaded.loglikelihood(_requests("loglikelihood", PAIRS))
    assert [s for s, _ in got] == pytest.approx([s for s, _ in ternary], abs=1e-5)
    assert [s for s, _ in got] != pytest.approx([s for s, _ in fp16], abs=1e-3)  # the quantization matters


def test_simple_evaluate_through_the_registered_name(tiny_run_checkpoint):
    manager = task_manager_for(["bitflow_next_line", "bitflow_next_identifier"])
    for model_args in (
        {"ckpt": str(tiny_run_checkpoint), "device": "cpu"},
        f"ckpt={tiny_run_checkpoint},device=cpu",
    ):
        results = lm_eval.simple_evaluate(
            model="bitflow",
            model_args=model_args,
            tasks=["bitflow_next_line", "bitflow_next_identifier"],
            task_manager=manager,
            limit=4,
            bootstrap_iters=0,
            log_samples=False,
        )
        line = results["results"]["bitflow_next_line"]
        ident = results["results"]["bitflow_next_identifier"]
        assert line["sample_len"] == 4 and ident["sample_len"] == 4
        assert 0.0 <= line["acc,none"] <= 1.0 and 0.0 <= line["acc_norm,none"] <= 1.0
        assert 0.0 <= ident["acc,none"] <= 1.0 and ident["perplexity,none"] > 1.0
        assert results["config"]["model"] == "bitflow"


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        BitflowLM(ckpt=str(tmp_path / "nope.ckpt"))


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a bitflow checkpoint"):
        BitflowLM(ckpt=str(path))
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a bitflow checkpoint"):
        BitflowLM(ckpt=str(tmp_path / "foreign.ckpt"))


def test_bad_model_args_are_clear_errors(tiny_lm, tiny_tokenizer, tiny_run_checkpoint):
    with pytest.raises(ValueError, match="unknown model_args.*pretrained"):
        BitflowLM(ckpt=str(tiny_run_checkpoint), pretrained="gpt2")
    with pytest.raises(ValueError, match="exactly one of ckpt"):
        BitflowLM()
    with pytest.raises(ValueError, match="batch_size"):
        BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, batch_size="many")
    with pytest.raises(ValueError, match="max_length"):
        BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, max_length=CONTEXT + 1)
    with pytest.raises(ValueError, match="precision"):
        BitflowLM(model=tiny_lm, tokenizer=tiny_tokenizer, precision="8")


@pytest.mark.integration  # a fresh interpreter
def test_importing_bitflow_eval_registers_the_model_lazily():
    # a fresh interpreter, as a .pth line `import bitflow.eval` starts it: lm-eval is not imported yet, and
    # `bitflow` appears in its registry next to the built-in models once lm-eval loads
    code = (
        "import sys, bitflow.eval\n"
        "assert 'lm_eval' not in sys.modules\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "assert 'hf' in model_registry and 'dummy' in model_registry\n"
        "print(get_model('bitflow').__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "BitflowLM"
