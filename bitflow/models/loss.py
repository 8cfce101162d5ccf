"""The LM loss: next-token cross-entropy through the output head, without the whole batch's fp32 logits.

``F.cross_entropy(lm_head(h).float(), y)`` materialises ``[tokens, vocab]`` logits in the compute dtype, a float32
copy, the softmax and its gradient: for the default tiny model (4,096 tokens x 8,192 vocab) that is 128 MiB per
tensor, and the LM head with the loss is about a third of the step. :func:`linear_cross_entropy` computes the same
loss and gradients over chunks of tokens: each chunk's logits are formed, reduced to the loss, turned into the
logits' gradient ``softmax - onehot`` and multiplied into the gradients of the hidden states and the head weight
right away (in the forward pass, so nothing of the chunk is kept and nothing is recomputed). Peak memory of the
head drops from several ``tokens x vocab`` tensors to one chunk's; the matmuls are the ones autograd would run.

Numerics follow ``F.linear`` under autocast: the matmuls run in the autocast dtype (bf16 under ``bf16-mixed``), the
softmax in float32; the weight gradient is accumulated over chunks in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CHUNK_LOGITS", "head_cross_entropy", "linear_cross_entropy", "next_token_loss"]

CHUNK_LOGITS = 1 << 23  # logits per chunk (32 MiB in float32): vocab 8,192 -> 1,024 tokens per chunk
IGNORE_INDEX = -100  # F.cross_entropy's default: targets with this value do not count


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, weight)`` computes in: autocast's when it is on for the device, else ``h``'s."""
    device = h.device.type
    if torch.is_autocast_enabled(device) and h.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunk_tokens(vocab: int, chunk_logits: int) -> int:
    """Tokens per chunk: ``chunk_logits // vocab``, at least 1."""
    return max(1, chunk_logits // max(vocab, 1))


def _loss_only(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, dtype: torch.dtype, chunk_logits: int):
    """Summed loss and the number of counted targets, chunk by chunk, without gradients."""
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    step = _chunk_tokens(weight.shape[0], chunk_logits)
    for s in range(0, h.shape[0], step):
        logits = F.linear(h[s : s + step].to(dtype), w, b).float()
        total += F.cross_entropy(logits, y[s : s + step], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss forward with the gradients computed chunk by chunk; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, mean, dtype, chunk_logits):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            step = _chunk_tokens(weight.shape[0], chunk_logits)
            for s in range(0, h.shape[0], step):
                hc, yc = h[s : s + step].to(dtype), y[s : s + step]
                logits = F.linear(hc, w, b).float()
                valid = (yc != IGNORE_INDEX).unsqueeze(-1)
                target = yc.clamp_min(0).unsqueeze(-1)
                # d loss / d logits = softmax - onehot (per counted token), from torch's fused softmax (one exp
                # per logit; logsumexp and then exp(logits - lse) took two and ran 2x slower on CPU). The log-sum-
                # exp comes from the row maximum m and the largest probability: lse = m - log(max p), and max p
                # >= 1 / vocab never underflows. The 1/count of a mean comes after the matmuls, in float32.
                top = logits.amax(dim=-1, keepdim=True)
                grad = torch.softmax(logits, dim=-1)
                lse = top - grad.amax(dim=-1, keepdim=True).log_()
                total += ((lse - logits.gather(-1, target)) * valid).sum()
                del logits
                grad.scatter_add_(-1, target, valid.to(grad.dtype).neg())
                g = grad.to(dtype)
                # the rows of ignored targets are masked on the narrow side of each product ([tokens, d], not
                # [tokens, vocab]): no pass over the chunk's logits, no host read
                if need_h:
                    grad_h[s : s + step] = (g @ w).mul_(valid)
                if need_w:
                    grad_w += (g.t() @ (hc * valid)).float()
                if need_b:
                    grad_b += (grad * valid).sum(0)
            scale = 1.0 / (y != IGNORE_INDEX).sum().to(torch.float32) if mean else torch.ones((), device=h.device)
            grads = [g if g is None else g.mul_(scale.to(g.dtype)) for g in (grad_h, grad_w, grad_b)]
        ctx.save_for_backward(*grads)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grads = [
            None if g is None else (g * grad_loss.to(g.dtype)).to(dt)
            for g, dt in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return *grads, None, None, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    y: Tensor,
    bias: Tensor | None = None,
    reduction: str = "mean",
    chunk_logits: int = CHUNK_LOGITS,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction=reduction)`` over chunks of tokens.

    ``h``: ``[N, d]`` hidden states, ``weight``: ``[V, d]``, ``y``: ``[N]`` targets (``-100`` = not counted).
    ``reduction``: ``"mean"`` (over counted targets) or ``"sum"``. The same value and gradients (to float
    rounding) as the unchunked expression, with at most ``chunk_logits`` logits alive at a time. With gradients
    enabled, the gradients wrt ``h``, ``weight`` and ``bias`` are computed during this call (and only scaled in the
    backward pass), so the call costs the forward and backward matmuls of the head.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; allowed: 'mean', 'sum'")
    dtype = _compute_dtype(h, weight)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, weight, bias)
    )
    if not wants_grad:
        total = _loss_only(h, weight, bias, y, dtype, chunk_logits)
        return total / (y != IGNORE_INDEX).sum() if reduction == "mean" else total
    return _LinearCrossEntropy.apply(h, weight, bias, y, reduction == "mean", dtype, chunk_logits)


def head_cross_entropy(head: nn.Module, h: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``head(h)`` against ``y`` (``h``: ``[..., d]``, ``y``: ``[...]``).

    A plain ``nn.Linear`` head without hooks takes :func:`linear_cross_entropy`; any other head (a quantized one,
    one with hooks) is called as a module and its logits go to ``F.cross_entropy`` in float32.
    """
    if type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return linear_cross_entropy(h.flatten(0, -2), head.weight, y.flatten(), head.bias, reduction)
    return F.cross_entropy(head(h).flatten(0, -2).float(), y.flatten(), reduction=reduction)


def next_token_loss(
    model: nn.Module, batch: Tensor, reduction: str = "mean", hidden_states: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Next-token cross-entropy of a batch of token ids ``[B, T+1]`` for a decoder with ``hidden_states`` and
    ``lm_head`` (:class:`~bitflow.models.llama.Llama`). ``hidden_states``: the function that computes them (e.g. a
    ``torch.compile``-d one); default ``model.hidden_states``."""
    x, y = batch[:, :-1], batch[:, 1:]
    h = (hidden_states or model.hidden_states)(x)
    return head_cross_entropy(model.lm_head, h, y, reduction)
