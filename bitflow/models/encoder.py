"""A BERT-style encoder for masked language modelling, as a plain ``nn.Module``.

Bidirectional self-attention with a key-padding mask (padded keys get no attention weight), learned absolute or
rotary positions (arXiv 2104.09864), pre-LayerNorm blocks with a GELU MLP, and BERT's MLM head (dense -> GELU ->
LayerNorm -> a projection to the vocabulary tied to the token embedding). Every projection is an ``nn.Linear``
(:class:`~bitflow.models.layers.Attention`), so the quantization recipes convert all of them; the tied
``lm_head`` stays 16-bit by the recipes' default ``exclude: [lm_head]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.layers import Attention, ConfigMixin, attention_mask
from bitflow.models.llama import rope_tables

__all__ = ["Encoder", "EncoderConfig"]

POSITIONS = ("learned", "rotary")


@dataclass
class EncoderConfig(ConfigMixin):
    """Shape of the encoder. Validated on construction."""

    vocab_size: int = 8192  # token ids, extra ids included (the task adds [MASK]); set by the CLI
    d_model: int = 128  # hidden size
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads; d_model must be divisible by it
    d_ff: int | None = None  # MLP hidden width; None = 4 d_model (BERT)
    max_seq_len: int = 256  # longest input (learned position table / RoPE tables)
    positions: str = "learned"  # learned (BERT) | rotary
    rope_theta: float = 10000.0  # RoPE base frequency (positions=rotary)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # std of the normal init (BERT)
    bias: bool = True  # biases on the linear layers (BERT has them)

    def __post_init__(self) -> None:
        self._positive("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        self._choice("positions", POSITIONS)
        if self.d_model % self.n_heads:
            raise ValueError(f"EncoderConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self._positive("d_ff")


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, bias=cfg.bias)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias), "fc2": nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)}
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, rope=rope)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.mlp_norm(x))))


class Encoder(nn.Module):
    """Token ids [B, T] (+ ``padding_mask`` [B, T], True = token) -> MLM logits [B, T, vocab_size]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        else:
            cos, sin = rope_tables(config.d_model // config.n_heads, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlm_head = nn.ModuleDict(
            {"dense": nn.Linear(config.d_model, config.d_model), "norm": nn.LayerNorm(config.d_model, eps=config.norm_eps)}
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.lm_head.weight = self.tok_emb.weight  # tied, as in BERT
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.config.init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; with ``non_embedding`` the token (and learned position) embeddings are left out."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if hasattr(self, "pos_emb") else 0)
        return n

    def hidden_states(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, d_model]; padded positions attend, but are never attended to."""
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(idx)
        rope = None
        if self.config.positions == "learned":
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        mask = attention_mask(padding_mask, t, t)
        for layer in self.layers:
            x = layer(x, mask, rope)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(idx, padding_mask)
        h = self.mlm_head["norm"](F.gelu(self.mlm_head["dense"](h)))
        return self.lm_head(h)
