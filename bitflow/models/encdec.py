"""A T5 v1.1-style encoder-decoder for span corruption, as a plain ``nn.Module``.

T5 v1.1 (Raffel et al. 2020, arXiv 1910.10683; v1.1 changes: gated-GELU FFN, no biases, untied output head):
RMSNorm pre-norm blocks, relative position buckets as a learned per-head attention bias shared by the layers of a
stack (or rotary positions), a bidirectional encoder, a causal decoder with cross-attention to the encoder output
(padded encoder positions masked). Every projection is an ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.layers import Attention, ConfigMixin, attention_mask, relative_position_bucket
from bitflow.models.llama import RMSNorm, rope_tables

__all__ = ["EncoderDecoder", "EncoderDecoderConfig"]

POSITIONS = ("relative", "rotary")


@dataclass
class EncoderDecoderConfig(ConfigMixin):
    """Shape of the encoder-decoder. Validated on construction."""

    vocab_size: int = 8192  # token ids, sentinels included (the task adds them); set by the CLI
    d_model: int = 128  # hidden size
    n_layers: int = 2  # encoder blocks
    n_decoder_layers: int | None = None  # decoder blocks; None = n_layers
    n_heads: int = 4  # attention heads; d_model must be divisible by it
    d_ff: int | None = None  # gated-GELU hidden width; None = 2 d_model (T5 v1.1 small: 1024 for 512)
    max_seq_len: int = 256  # longest input or target (RoPE tables)
    positions: str = "relative"  # relative (T5 buckets) | rotary
    relative_buckets: int = 32  # T5's relative_attention_num_buckets
    relative_max_distance: int = 128  # T5's relative_attention_max_distance
    rope_theta: float = 10000.0  # RoPE base frequency (positions=rotary)
    norm_eps: float = 1e-6  # RMSNorm epsilon (T5)
    init_std: float = 0.02  # std of the normal init

    def __post_init__(self) -> None:
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        self._positive("vocab_size", "d_model", "n_layers", "n_decoder_layers", "n_heads", "max_seq_len",
                       "relative_buckets", "relative_max_distance")
        self._choice("positions", POSITIONS)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"EncoderDecoderConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.d_ff is None:
            self.d_ff = 2 * self.d_model
        self._positive("d_ff")


class GatedGELU(nn.Module):
    """T5 v1.1's FFN: wo(gelu(wi_0 x) * wi_1 x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class EncDecBlock(nn.Module):
    """An encoder block (self-attention, FFN) or, with ``cross``, a decoder block (+ cross-attention)."""

    def __init__(self, cfg: EncoderDecoderConfig, cross: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        if cross:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.cross = Attention(cfg.d_model, cfg.n_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GatedGELU(cfg.d_model, cfg.d_ff)

    def forward(self, x, mask, rope, memory=None, memory_mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, rope=rope)
        if memory is not None:
            x = x + self.cross(self.cross_norm(x), kv=memory, mask=memory_mask)
        return x + self.mlp(self.mlp_norm(x))


class EncoderDecoder(nn.Module):
    """``(src [B, S], tgt_in [B, T], src_mask [B, S] True = token)`` -> logits [B, T, vocab_size]."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)  # shared by encoder and decoder (T5)
        self.encoder = nn.ModuleList(EncDecBlock(config, cross=False) for _ in range(config.n_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder = nn.ModuleList(EncDecBlock(config, cross=True) for _ in range(config.n_decoder_layers))
        self.decoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied (v1.1)
        if config.positions == "relative":
            self.encoder_bias = nn.Embedding(config.relative_buckets, config.n_heads)
            self.decoder_bias = nn.Embedding(config.relative_buckets, config.n_heads)
        else:
            cos, sin = rope_tables(config.d_model // config.n_heads, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=config.init_std)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; with ``non_embedding`` the token embedding and the output head are left out."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.tok_emb.weight.numel() + self.lm_head.weight.numel() if non_embedding else 0)

    def position_bias(self, table: nn.Embedding, t_q: int, t_k: int, bidirectional: bool) -> torch.Tensor:
        """[1, H, Tq, Tk] learned bias of the bucket of ``key position - query position``."""
        pos_q = torch.arange(t_q, device=table.weight.device)
        pos_k = torch.arange(t_k, device=table.weight.device)
        buckets = relative_position_bucket(
            pos_k[None, :] - pos_q[:, None], bidirectional, self.config.relative_buckets,
            self.config.relative_max_distance,
        )
        return table(buckets).permute(2, 0, 1)[None]

    def _rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.config.positions == "rotary" else None

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, d_model]."""
        s = src.shape[1]
        if s > self.config.max_seq_len:
            raise ValueError(f"input length {s} exceeds the model's max_seq_len={self.config.max_seq_len}")
        bias = self.position_bias(self.encoder_bias, s, s, True) if self.config.positions == "relative" else None
        mask = attention_mask(src_mask, s, s, bias=bias)
        x = self.tok_emb(src)
        for block in self.encoder:
            x = block(x, mask, self._rope())
        return self.encoder_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits [B, T, vocab_size]: causal self-attention, cross-attention to ``memory``."""
        t = tgt_in.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"target length {t} exceeds the model's max_seq_len={self.config.max_seq_len}")
        bias = self.position_bias(self.decoder_bias, t, t, False) if self.config.positions == "relative" else None
        mask = attention_mask(None, t, t, causal=True, bias=bias, device=tgt_in.device)
        memory_mask = attention_mask(src_mask, t, memory.shape[1])
        y = self.tok_emb(tgt_in)
        for block in self.decoder:
            y = block(y, mask, self._rope(), memory, memory_mask)
        return self.lm_head(self.decoder_norm(y))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)
