"""Windows and batched scoring (bitflow.eval.scoring), checked against hand-worked windows and direct
forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitflow.eval.scoring import Window, continuation_windows, rolling_windows, score_windows

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint


def test_rolling_windows_match_the_hand_worked_example():
    # stream s = [0, 10, 11, ..., 19]; context 4: predict s[1:5] from s[0:4], s[5:9] from s[4:8], and the last
    # two (s[9:11]) with a full context s[6:10]
    windows = rolling_windows(list(range(10, 20)), max_len=4, prefix=0)
    assert windows == [
        Window((0, 10, 11, 12, 13), 4),
        Window((13, 14, 15, 16, 17), 4),
        Window((15, 16, 17, 18, 19), 2),
    ]


def test_rolling_windows_with_a_stride():
    # stride 2, context 4, no prefix: the first window covers s[1:5] (there is no more context), then 2 by 2
    windows = rolling_windows([1, 2, 3, 4, 5, 6, 7, 8], max_len=4, stride=2)
    assert windows == [
        Window((1, 2, 3, 4, 5), 4),
        Window((3, 4, 5, 6, 7), 2),
        Window((4, 5, 6, 7, 8), 1),
    ]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 16, 17, 40])
@pytest.mark.parametrize("max_len,stride", [(4, None), (4, 1), (4, 3), (8, 5), (1, None)])
def test_every_token_is_scored_exactly_once(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    stream = [7] + tokens
    scored = []
    for w in rolling_windows(tokens, max_len, stride=stride, prefix=7):
        assert len(w.tokens) <= max_len + 1
        # the window is a contiguous slice of the stream ending at its last scored token
        end = stream.index(w.tokens[-1]) + 1
        assert tuple(stream[end - len(w.tokens) : end]) == w.tokens
        scored += list(range(end - w.n_scored, end))
        # each scored token sees at least max_len + 1 - stride tokens, or everything before it
        first = end - w.n_scored
        assert first - (end - len(w.tokens)) >= min(first, max_len + 1 - (stride or max_len))
    assert scored == list(range(1, n + 1))


def test_continuation_windows_cut_the_context_from_the_left():
    assert continuation_windows([1, 2, 3, 4, 5], [6, 7], max_len=4) == [Window((3, 4, 5, 6, 7), 2)]
    assert continuation_windows([1], [2, 3], max_len=4) == [Window((1, 2, 3), 2)]


def test_a_continuation_longer_than_the_context_is_scored_in_half_context_windows():
    # context [1, 2], continuation [3..8], max_len 4 -> stride 2: scores 3,4,5 | 6,7 | 8
    assert continuation_windows([1, 2], [3, 4, 5, 6, 7, 8], max_len=4) == [
        Window((1, 2, 3, 4, 5), 3),
        Window((3, 4, 5, 6, 7), 2),
        Window((4, 5, 6, 7, 8), 1),
    ]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rolling_windows([1, 2], 4, stride=5), "stride"),
        (lambda: rolling_windows([1, 2], 0), "max_len"),
        (lambda: continuation_windows([], [1], 4), "context"),
        (lambda: continuation_windows([1], [], 4), "continuation"),
        (lambda: Window((1, 2), 2), "n_scored"),
    ],
)
def test_bad_windows_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _direct(model, w: Window) -> tuple[float, bool]:
    logits = model.model(torch.tensor([w.tokens[:-1]]))[0]
    logp = F.log_softmax(logits.double(), dim=-1)
    n_in = len(w.tokens) - 1
    total, greedy = 0.0, True
    for j in range(n_in - w.n_scored, n_in):
        target = w.tokens[j + 1]
        total += logp[j, target].item()
        greedy &= int(logp[j].argmax()) == target
    return total, greedy


def test_batched_scores_equal_one_forward_per_window(tiny_lm):
    windows = [
        Window((5, 9, 33, 12, 40, 2), 3),
        Window((7, 8), 1),
        Window((100, 101, 102, 103), 3),
        Window((5, 9, 33, 12, 40, 2, 250, 17, 3), 9 - 1),
    ]
    for batch_size in (1, 2, 8):
        got = score_windows(tiny_lm.model, windows, batch_size=batch_size)
        for w, (score, greedy) in zip(windows, got, strict=True):
            want, want_greedy = _direct(tiny_lm, w)
            assert score == pytest.approx(want, abs=1e-4)
            assert greedy == want_greedy


def test_greedy_is_true_for_the_argmax_continuation(tiny_lm):
    tokens = [11, 42, 7]
    for _ in range(4):  # extend greedily
        tokens.append(int(tiny_lm.model(torch.tensor([tokens]))[0, -1].argmax()))
    (score, greedy), (_, not_greedy) = score_windows(
        tiny_lm.model, [Window(tuple(tokens), 4), Window(tuple(tokens[:-1]) + ((tokens[-1] + 1) % 300,), 4)]
    )
    assert greedy is True
    assert not_greedy is False
    assert score < 0
