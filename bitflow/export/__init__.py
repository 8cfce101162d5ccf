"""Interop: bitflow checkpoints out to Hugging Face (dense, BitNet-packed) and GGUF (llama.cpp), and pretrained
Hugging Face Llama-family models in.

    bitflow-export ckpt=<run>/checkpoints/last.ckpt format=hf out=exports/hf
    bitflow-export ckpt=... format=gguf weights=tq2_0 out=model.gguf
    bitflow model=hf model.path=DIR data=text ... transition=default transition.at=0

:mod:`bitflow.export.source` reads a checkpoint into what every format needs (the decoder, the tokenizer, the
ternary codes and scales); one module per format writes it (:mod:`~bitflow.export.hf`,
:mod:`~bitflow.export.hf_bitnet`, :mod:`~bitflow.export.gguf_file`); :mod:`~bitflow.export.run` is the command.
"""
