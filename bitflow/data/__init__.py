"""Data pipeline: corpus sources -> byte-level BPE tokenizer -> memory-mapped token caches -> DataModule."""

from bitflow.data.cache import TokenCache, build_token_cache
from bitflow.data.datamodule import ShardSampler, TokenDataModule, TrainWindows, ValWindows
from bitflow.data.sources import HFSource, Source, StdlibSource, TextSource, build_source
from bitflow.data.splits import SplitPlan, TokenRange, plan_splits
from bitflow.data.tokenizer import EOS_TOKEN, build_tokenizer, load_tokenizer, tokenizer_from_checkpoint

__all__ = [
    "EOS_TOKEN",
    "HFSource",
    "ShardSampler",
    "Source",
    "SplitPlan",
    "StdlibSource",
    "TextSource",
    "TokenCache",
    "TokenDataModule",
    "TokenRange",
    "TrainWindows",
    "ValWindows",
    "build_source",
    "build_token_cache",
    "build_tokenizer",
    "load_tokenizer",
    "plan_splits",
    "tokenizer_from_checkpoint",
]
