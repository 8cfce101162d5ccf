"""A Llama-style decoder as a plain ``nn.Module`` (no Lightning in here).

RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021, arXiv 2104.09864), SwiGLU MLP
(Shazeer 2020, arXiv 2002.05202), causal attention through ``F.scaled_dot_product_attention`` with optional
grouped-query heads, and optionally tied input/output embeddings. Every linear layer is a plain ``nn.Linear``
so :func:`bitflow.quant.to_bitlinear` can swap them for ``BitLinear`` in place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    """Shape and initialisation of the decoder. Validated on construction."""

    vocab_size: int = 8192  # tokens in the vocabulary (set from the tokenizer by the CLI)
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads; d_model must be divisible by it
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    d_ff: int | None = None  # SwiGLU hidden width; None = 8/3 d_model rounded up to a multiple of 64
    max_seq_len: int = 256  # longest context the model accepts (RoPE tables are built for it)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the token embedding with the LM head (saves V*d parameters)
    init_std: float = 0.02  # std of the normal init; residual output projections get std / sqrt(2 n_layers)
    bias: bool = False  # biases on the linear layers (Llama has none)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_kv_heads={self.n_kv_heads} must be a positive divisor of n_heads={self.n_heads}"
            )
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_ff <= 0:
            raise ValueError(f"LlamaConfig.d_ff must be positive, got {self.d_ff}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("LlamaConfig.rope_theta, norm_eps and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] for the rotate-half form of RoPE (arXiv 2104.09864)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


ATTENTION_MODES = ("auto", "sdpa", "matmul")
# the largest causal score tensor (batch x heads x T x T) that ``attention: auto`` forms on the CPU: 16 Mi scores
MATMUL_ATTENTION_SCORES = 1 << 24


def check_attention(value: object) -> str:
    """``value`` if it is an attention mode (``auto``, ``sdpa``, ``matmul``), else ``ValueError`` naming the key."""
    if value not in ATTENTION_MODES:
        raise ValueError(f"attention={value!r} is not allowed; allowed: {', '.join(ATTENTION_MODES)}")
    return str(value)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Causal self-attention of ``q``, ``k``, ``v`` [B, H, T, D] (same H), as
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.

    ``mode="matmul"`` computes the attention formula as written: ``softmax(q k^T / sqrt(D) + causal -inf) v``, two
    batched matmuls in the inputs' dtype around torch's softmax (which accumulates in float32). Under bf16 autocast
    the scores and probabilities are rounded to bf16 as they are written (as in Hugging Face's eager attention):
    outputs differ from the flash kernel's by about two bf16 ulps; in float32 they agree to 1e-6. ``"sdpa"`` is
    torch's kernel. ``"auto"`` takes the matmul form on the CPU for short sequences (at most
    :data:`MATMUL_ATTENTION_SCORES` scores), where torch's CPU flash kernel was measured about 2.6-3.1x slower forward
    plus backward at T = 256 (``make bench``, the attention table), and SDPA elsewhere (GPUs: the flash kernels).
    """
    b, h, t, d = q.shape
    if mode == "sdpa" or (mode == "auto" and (q.device.type != "cpu" or b * h * t * t > MATMUL_ATTENTION_SCORES)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    device_type = q.device.type
    with torch.autocast(device_type, enabled=False):  # q, k, v are already in the compute dtype
        dtype = torch.promote_types(q.dtype, k.dtype)
        future = torch.zeros(t, t, dtype=dtype, device=q.device).masked_fill_(
            torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        # -inf above the diagonal + (q k^T) / sqrt(d): one batched matmul
        scores = torch.baddbmm(future, q.reshape(b * h, t, d).to(dtype),
                               k.reshape(b * h, t, d).transpose(1, 2).to(dtype), alpha=1.0 / math.sqrt(d))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.bmm(probs, v.reshape(b * h, t, d)).view(b, h, t, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles. x: [B, H, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for generation without recomputing the prefix.

    Tensors [B, n_kv_heads, max_seq_len, head_dim] are allocated on first use; ``length`` is the number of cached
    positions (the position of the next token). :meth:`Llama.forward` with a cache reads and extends it.
    """

    def __init__(self, n_layers: int, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``/``v`` [B, H, t, D] of ``layer`` after the cached ones; all keys/values so far."""
        start, t = self.length, k.shape[2]
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_seq_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, start : start + t] = k
        self.values[layer][:, :, start : start + t] = v
        return self.keys[layer][:, :, : start + t], self.values[layer][:, :, : start + t]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.mode = "auto"  # the causal attention kernel (causal_attention; set by Llama.set_attention)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        mask, causal = None, True
        if cache is not None and cache.length > 0:  # new tokens attend to every cached one and causally among them
            start = cache.length
            k, v = cache.update(layer, k, v)
            causal = False
            if t > 1:
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        elif cache is not None:
            cache.update(layer, k, v)
        if causal and mask is None and self.n_kv_heads == self.n_heads:
            y = causal_attention(q, k, v, self.mode)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (arXiv 2002.05202)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LM: token ids [B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # not persistent: derived from the config, so checkpoints stay small and presets can change max_seq_len
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm gains stay at 1, biases at 0
            # GPT-2 / nanoGPT: scale the residual output projections down by sqrt(2 * n_layers)
            s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            nn.init.normal_(p, mean=0.0, std=s)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_attention(self, mode: str) -> None:
        """The causal attention kernel of every block: ``auto``, ``sdpa`` or ``matmul`` (:func:`causal_attention`;
        the ``attention`` key of a run). A runtime choice, not part of the model's config or state."""
        check_attention(mode)
        for m in self.modules():
            if isinstance(m, Attention):
                m.mode = mode

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; with ``non_embedding`` the token embedding (and an untied head) are left out."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this model (generation: prefill the prompt, then one token per call)."""
        return KVCache(self.config.n_layers, self.config.max_seq_len)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, d_model] (before the LM head). With ``cache``, ``idx`` continues the
        cached tokens (positions ``cache.length ...``) and the cache is extended by it."""
        t = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {start + t} exceeds the model's max_seq_len={self.config.max_seq_len}"
            )
        x = self.tok_emb(idx)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab_size]; with ``cache`` see :meth:`hidden_states`. ``hidden_only``: the hidden states
        (training's chunked loss applies the head itself), through the module call, so that wrappers that act
        around ``forward`` (FSDP2's gathering of sharded weights, hooks) see it."""
        h = self.hidden_states(idx, cache)
        return h if hidden_only else self.lm_head(h)
