"""Hugging Face ``LlamaForCausalLM`` directories: bitflow's decoder out (``format=hf``) and in (``model=hf``).

bitflow's Llama maps onto transformers' ``LlamaForCausalLM`` one to one: both use rotate-half RoPE (no
permutation of the Q/K rows), RMSNorm with a gain (``rms_norm_eps`` written explicitly: transformers' default is
1e-6, bitflow's 1e-5), SwiGLU, grouped-query heads and optionally tied embeddings.

==================================  ==============================================
bitflow                             transformers
==================================  ==============================================
tok_emb.weight                      model.embed_tokens.weight
layers.N.attn_norm.weight           model.layers.N.input_layernorm.weight
layers.N.attn.wq / wk / wv / wo     model.layers.N.self_attn.q_proj / k / v / o_proj
layers.N.mlp_norm.weight            model.layers.N.post_attention_layernorm.weight
layers.N.mlp.w1 / w3 / w2           model.layers.N.mlp.gate_proj / up_proj / down_proj
norm.weight                         model.norm.weight
lm_head.weight                      lm_head.weight (absent when tied)
==================================  ==============================================
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from bitflow.data.tokenizer import eos_id, eos_token
from bitflow.models.llama import LlamaConfig

__all__ = [
    "HF_NAMES", "bitflow_name", "from_hf_config", "hf_config", "hf_name", "load_hf_model", "read_hf_config",
    "read_hf_weights", "write_hf", "write_hf_tokenizer",
]

# bitflow module path -> transformers module path, per block
HF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}
_TOP = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(name: str) -> str:
    """transformers' parameter name of bitflow's ``name`` (``layers.0.attn.wq.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``)."""
    m = _BLOCK.match(name)
    if m:
        return f"model.layers.{m[1]}.{HF_NAMES[m[2]]}.{m[3]}"
    module, _, leaf = name.rpartition(".")
    return f"{_TOP[module]}.{leaf}"


def bitflow_name(name: str) -> str | None:
    """bitflow's parameter name of transformers' ``name``; None for a name bitflow has no place for."""
    m = _HF_BLOCK.match(name)
    if m:
        inverse = {v: k for k, v in HF_NAMES.items()}
        return f"layers.{m[1]}.{inverse[m[2]]}.{m[3]}" if m[2] in inverse else None
    module, _, leaf = name.rpartition(".")
    inverse = {v: k for k, v in _TOP.items()}
    return f"{inverse[module]}.{leaf}" if module in inverse else None


def hf_config(cfg: LlamaConfig, tokenizer: Tokenizer, **extra: Any) -> Any:
    """transformers' ``LlamaConfig`` of bitflow's decoder config (EOS = BOS = ``<|endoftext|>``: bitflow's
    streams separate documents with it)."""
    from transformers import LlamaConfig as HFLlamaConfig

    eos = eos_id(tokenizer)
    return HFLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        hidden_act="silu",
        initializer_range=cfg.init_std,
        bos_token_id=eos,
        eos_token_id=eos,
        architectures=["LlamaForCausalLM"],
        **extra,
    )


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> None:
    """The checkpoint's own byte-level BPE as a fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
    that ``AutoTokenizer.from_pretrained`` loads; no special tokens are added on encode (as in bitflow)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        eos_token=eos_token(tokenizer),
        bos_token=eos_token(tokenizer),
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


def write_hf(out: Path, cfg: LlamaConfig, weights: dict[str, Tensor], tokenizer: Tokenizer,
             dtype: torch.dtype = torch.float32, extra_config: dict[str, Any] | None = None,
             raw: dict[str, Tensor] | None = None) -> None:
    """Write a ``LlamaForCausalLM`` directory into the (new, empty) folder ``out``: ``config.json``,
    ``model.safetensors`` (bitflow's ``weights`` renamed, cast to ``dtype``; ``raw`` tensors are added under their
    own names and dtypes), the tokenizer and ``generation_config.json``."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tensors = {}
    for name, w in weights.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        tensors[hf_name(name)] = w.detach().to(dtype).contiguous()
    tensors.update(raw or {})
    hf_cfg = hf_config(cfg, tokenizer, **(extra_config or {}))
    hf_cfg.torch_dtype = str(dtype).removeprefix("torch.")
    hf_cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_hf_tokenizer(tokenizer, out, cfg.max_seq_len)
    eos = eos_id(tokenizer)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, max_length=cfg.max_seq_len).save_pretrained(str(out))


# -------------------------------------------------------------------------------------------------- import
SUPPORTED_TYPES = ("llama", "mistral")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a local Hugging Face model directory, with errors naming ``model.path``."""
    path = Path(path).expanduser()
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"model.path={str(path)!r} is not allowed: no config.json there (give a local Hugging Face model "
            "directory, e.g. one saved with save_pretrained)"
        )
    return json.loads(file.read_text())


def _unrepresentable(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"the Hugging Face config's {field}={value!r} cannot be represented in bitflow's decoder: {why}")


def from_hf_config(hf: dict[str, Any], max_seq_len: int | None = None) -> LlamaConfig:
    """bitflow's ``LlamaConfig`` of a transformers Llama-family ``config.json``; ValueError naming the field
    bitflow's decoder cannot represent (another architecture, activation, RoPE scaling, sliding window, ...)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise _unrepresentable("model_type", model_type, f"supported: {', '.join(SUPPORTED_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unrepresentable("hidden_act", hf["hidden_act"], "bitflow's MLP is SwiGLU (silu)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unrepresentable("rope_scaling", rope, "bitflow's RoPE has no scaling (rope_type default only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("sliding_window") is not None:
        raise _unrepresentable("sliding_window", hf["sliding_window"], "bitflow's attention is full causal")
    if hf.get("pretraining_tp", 1) != 1:
        raise _unrepresentable("pretraining_tp", hf["pretraining_tp"], "only 1")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise _unrepresentable(
            "attention_bias", hf.get("attention_bias"),
            f"bitflow's model.bias covers every linear layer, but mlp_bias={hf.get('mlp_bias')!r}",
        )
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise _unrepresentable(
            "head_dim", head_dim, f"bitflow needs head_dim = hidden_size / num_attention_heads = {d_model / n_heads}"
        )
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=int(max_seq_len or hf.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        bias=bool(hf.get("attention_bias", False)),
    )
    try:
        return LlamaConfig(**fields)
    except ValueError as err:
        raise ValueError(f"the Hugging Face config cannot be represented in bitflow's decoder: {err}") from None


def read_hf_weights(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors files (one file or shards), by transformers' names."""
    from safetensors.torch import load_file

    files = sorted(Path(path).expanduser().glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.path={str(path)!r} is not allowed: no *.safetensors weights there")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def load_hf_model(path: str | Path, max_seq_len: int | None = None) -> tuple[LlamaConfig, dict[str, Tensor]]:
    """bitflow's decoder config and state dict (float32) of a local Hugging Face Llama-family directory."""
    cfg = from_hf_config(read_hf_config(path), max_seq_len)
    sd: dict[str, Tensor] = {}
    unknown = []
    for name, w in read_hf_weights(path).items():
        ours = bitflow_name(name)
        if ours is None:
            if not name.endswith("rotary_emb.inv_freq"):
                unknown.append(name)
            continue
        sd[ours] = w.float()
    if unknown:
        raise ValueError(f"the Hugging Face weights {unknown[:4]} have no place in bitflow's decoder")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return cfg, sd


def hf_tokenizer_file(path: str | Path) -> Path:
    """The directory's ``tokenizer.json``; bitflow needs a fast tokenizer with an end-of-document token
    (:data:`bitflow.data.tokenizer.EOS_TOKENS`)."""
    file = Path(path).expanduser() / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"model.path={str(path)!r} is not allowed: no tokenizer.json (a fast tokenizer) there"
        )
    eos_id(Tokenizer.from_file(str(file)))
    return file


HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(source: Any, out: Path, weights: str = "f32", overwrite: bool = False) -> Path:
    """``format=hf``: a dense ``LlamaForCausalLM`` directory; ternary layers as their dequantized weights
    ``codes / s_w`` (the model then computes bitflow's forward at activation strength 0)."""
    from bitflow.io import atomic_directory

    dense = source.dense_weights()  # raises for weights that are not ternary yet, before anything is written
    with atomic_directory(out, overwrite) as tmp:
        write_hf(tmp, source.decoder.config, dense, source.tokenizer, HF_DTYPES[weights])
    return out


def resolve_hf_model(cfg: Any) -> str | None:
    """``bitflow model=hf model.path=DIR``: replace the ``model`` section of a training config (in place) by the
    directory's architecture, point ``data.tokenizer_path`` at its ``tokenizer.json`` and record the directory as
    ``init_from`` (the weights load after the model is built: :func:`load_hf_weights`). Returns the directory, or
    None when the config has no ``model.path``. Raises ValueError/FileNotFoundError naming the field."""
    from omegaconf import OmegaConf, open_dict

    model = cfg.model
    if "path" not in model.keys():  # (`in` is false for a missing ??? value)
        return None
    if OmegaConf.is_missing(model, "path") or model.path in (None, ""):
        raise ValueError(
            "model.path is required with model=hf: a local Hugging Face Llama-family directory (config.json, "
            "*.safetensors, tokenizer.json)"
        )
    path = str(Path(str(model.path)).expanduser())
    llama = from_hf_config(read_hf_config(path), model.get("max_seq_len"))
    tok_file = hf_tokenizer_file(path)
    n_vocab = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    if n_vocab != llama.vocab_size:
        raise ValueError(
            f"model.path={path!r}: its tokenizer has {n_vocab} tokens but config.json's vocab_size is "
            f"{llama.vocab_size}; bitflow sizes the embedding from the tokenizer, so they must be equal"
        )
    fields = {k: v for k, v in llama.to_dict().items() if k != "vocab_size"}
    with open_dict(cfg):
        cfg.model = OmegaConf.create(fields)
        if cfg.data.get("tokenizer_path") is None:
            cfg.data.tokenizer_path = str(tok_file)
        cfg.init_from = path
    return path


def load_hf_weights(decoder: Any, path: str | Path) -> None:
    """Load a Hugging Face directory's weights into bitflow's decoder built from its config (strict: every
    tensor has its place and every parameter a tensor)."""
    cfg, sd = load_hf_model(path, decoder.config.max_seq_len)
    if cfg.to_dict() != decoder.config.to_dict():
        from bitflow.checkpoint import check_same_model

        check_same_model(decoder.config.to_dict(), cfg.to_dict())
    decoder.load_state_dict(sd, strict=True)
