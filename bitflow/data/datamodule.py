"""The Lightning DataModule: tokenizer + token caches -> training and validation windows.

Training batches are random windows of ``seq_len + 1`` tokens from the train array, an infinite stream whose
content is a pure function of ``(seed, sample index)``: sample ``s`` starts at ``splitmix64(s ^ splitmix64(seed))
mod (N - seq_len)``. Batch ``k`` holds samples ``k*B .. k*B + B - 1``; on step ``i`` rank ``r`` of ``W`` ranks takes
batch ``k = i*W + r``, so ranks never share a sample, and a resumed run starts at step
``i = global_step * accumulate_grad_batches`` and sees exactly what the uninterrupted run would have seen.

Validation uses fixed windows over the val array that start every ``seq_len`` tokens, so their targets
(``window[1:]``) tile the array without overlap; ranks take windows ``r::W`` with no padding or duplicates.

Which tokens are the training and validation arrays is decided by :func:`bitflow.data.splits.plan_splits`: the
two caches, or for a corpus of one or a few files the training stream and its held-out tail (the log says so).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from bitflow.data.cache import TokenCache, build_token_cache, default_cache_dir
from bitflow.data.sources import Source, check_int
from bitflow.data.splits import SplitPlan, TokenRange, plan_splits
from bitflow.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    build_tokenizer,
    check_vocab_size,
    eos_id,
    load_tokenizer,
)

log = logging.getLogger(__name__)

DEFAULT_VAL_WINDOWS = 64  # the one default of data.val_windows (conf/data/stdlib.yaml restates it; a test checks)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al., 2014), elementwise on uint64: a cheap, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_starts(sample_ids: np.ndarray, seed: int, num_starts: int) -> np.ndarray:
    """Start offsets in ``[0, num_starts)`` of the given training samples: a hash of ``(seed, sample id)``,
    independent of batch size, rank and worker."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    return (_splitmix64(sample_ids.astype(np.uint64) ^ key) % np.uint64(num_starts)).astype(np.int64)


def _as_array(tokens: np.ndarray | TokenCache | TokenRange) -> np.ndarray:
    return tokens if isinstance(tokens, np.ndarray) else tokens.load()


class _TokenArrayDataset:
    """Holds a token array; when built from a TokenCache or TokenRange, pickles as that (not the data), so
    DataLoader workers started with 'spawn' re-open the memory map instead of copying the array."""

    def _init_tokens(self, tokens: np.ndarray | TokenCache | TokenRange) -> None:
        self._cache = None if isinstance(tokens, np.ndarray) else tokens
        self._tokens = _as_array(tokens)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._cache is not None:
            state["_tokens"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._tokens is None:
            self._tokens = self._cache.load()

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens


class TrainWindows(_TokenArrayDataset, IterableDataset):
    """Infinite stream of training batches, each a LongTensor ``[batch_size, seq_len + 1]`` of random windows.

    Use with ``DataLoader(ds, batch_size=None)``. On step ``i`` (counted from ``start_step``) this rank yields
    batch ``k = i * world_size + rank``; DataLoader worker ``w`` of ``n`` produces steps ``w, w + n, ...`` so the
    loader's round-robin order gives the same sequence for any number of workers.
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenCache | TokenRange,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        self._init_tokens(tokens)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"data.seq_len={seq_len} is not allowed: the training split has {len(self.tokens)} tokens, fewer "
                f"than one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or add text"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def batch_index(self, step: int) -> int:
        """Global batch index this rank reads on ``step``."""
        return step * self.world_size + self.rank

    def sample_starts(self, batch_index: int) -> np.ndarray:
        """Start offsets of the samples ``batch_index * B .. batch_index * B + B - 1``."""
        ids = np.arange(batch_index * self.batch_size, (batch_index + 1) * self.batch_size, dtype=np.uint64)
        return window_starts(ids, self.seed, len(self.tokens) - self.seq_len)

    def batch(self, batch_index: int) -> torch.Tensor:
        """The batch with this global index, ``[B, seq_len + 1]`` int64."""
        starts = self.sample_starts(batch_index)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return torch.from_numpy(windows.astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in itertools.count(worker, num_workers):
            yield self.batch(self.batch_index(self.start_step + i))


class ValWindows(_TokenArrayDataset, Dataset):
    """Fixed validation windows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens, so each token after
    the first is a target exactly once. With ``max_windows``, that many windows evenly spaced over the array."""

    def __init__(
        self, tokens: np.ndarray | TokenCache | TokenRange, seq_len: int, max_windows: int | None = None
    ):
        self._init_tokens(tokens)
        self.seq_len = seq_len
        total = (len(self.tokens) - 1) // seq_len
        if total == 0:
            raise ValueError(
                f"data.seq_len={seq_len} is not allowed: the validation split has {len(self.tokens)} tokens, "
                f"fewer than one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or add text"
            )
        index = np.arange(total)
        if max_windows is not None and max_windows < total:
            index = (np.arange(max_windows) * total) // max_windows
        self.offsets = index * seq_len

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.offsets[i])
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: every index on exactly one rank, no padding
    (ranks may differ by one item). Use with ``Trainer(use_distributed_sampler=False)``."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class _ResumingLoader(DataLoader):
    """A DataLoader over :class:`TrainWindows` that asks ``start_step_fn`` where to start each time it is
    iterated (a new epoch, a resumed run), so the stream continues instead of replaying from the beginning."""

    def __init__(self, dataset: TrainWindows, start_step_fn: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.start_step_fn = start_step_fn

    def __iter__(self):
        self.dataset.start_step = self.start_step_fn()
        return super().__iter__()


class TokenDataModule(L.LightningDataModule):
    """Tokenizes a :class:`~bitflow.data.sources.Source` once (cached) and serves token windows.

    Constructing one only checks the arguments (cheap: no tokenizing, no reading of the corpus); the tokenizer
    and the token caches are built in ``prepare_data``/``setup``. Errors name the config keys (``data.seq_len``).

    Args:
        source: the corpus (``build_source(...)`` or a Hydra ``_target_``), ``data.source``.
        seq_len: tokens per training example; batches are ``[B, seq_len + 1]`` (inputs ``b[:, :-1]``, targets
            ``b[:, 1:]``).
        batch_size: training windows per batch and rank.
        vocab_size: size of the BPE trained on the train split (ignored when ``tokenizer_path`` is given).
        tokenizer_path: a ``tokenizer.json`` to use instead of training one.
        cache_dir: where tokenizers and token arrays are cached; default ``$BITFLOW_CACHE`` or ``~/.cache/bitflow``.
        num_workers: DataLoader worker processes.
        val_batch_size: validation batch size (default ``batch_size``).
        val_windows: use at most this many validation windows, evenly spaced (None: all).
        seed: seed of the training window positions.
    """

    def __init__(
        self,
        source: Source,
        seq_len: int,
        batch_size: int,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        tokenizer_path: str | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        val_windows: int | None = DEFAULT_VAL_WINDOWS,
        seed: int = 0,
    ):
        super().__init__()
        if not isinstance(source, Source):
            raise TypeError(
                f"data.source must be a bitflow.data.sources.Source (e.g. build_source('stdlib')), "
                f"got {type(source)!r}"
            )
        check_int("data.seq_len", seq_len, 1)
        check_int("data.batch_size", batch_size, 1)
        check_int("data.num_workers", num_workers, 0)
        check_int("data.val_batch_size", val_batch_size, 1, allow_none=True)
        check_int("data.val_windows", val_windows, 1, allow_none=True)
        check_int("data.seed", seed, 0)
        if tokenizer_path is not None:
            if not Path(tokenizer_path).expanduser().is_file():
                raise FileNotFoundError(f"data.tokenizer_path={str(tokenizer_path)!r} is not allowed: no such file")
        else:
            check_vocab_size(vocab_size)
        self.source = source
        self.seq_len, self.batch_size, self.requested_vocab_size = seq_len, batch_size, vocab_size
        self.tokenizer_path = tokenizer_path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.num_workers = num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.val_windows, self.seed = val_windows, seed
        self._tokenizer: Tokenizer | None = None
        self.caches: dict[str, TokenCache] = {}
        self.plan: SplitPlan | None = None
        self.train_dataset: TrainWindows | None = None
        self.val_dataset: ValWindows | None = None

    # --- tokenizer -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded, read from the cache, or trained on first access)."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer, hit = build_tokenizer(self.source, self.requested_vocab_size, self.cache_dir)
                log.info("tokenizer %s (vocab %d)", "cache hit" if hit else "trained", self._tokenizer.get_vocab_size())
            eos_id(self._tokenizer)  # fail early on a tokenizer without <|endoftext|>
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's actual vocabulary size (can be below the requested one for a tiny corpus)."""
        return self.tokenizer.get_vocab_size()

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer as a JSON string, for ``checkpoint["bitflow"]["tokenizer"]``."""
        return self.tokenizer.to_str()

    @property
    def eos_id(self) -> int:
        """Id of the ``<|endoftext|>`` token that ends every document."""
        return eos_id(self.tokenizer)

    # --- preparation -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build (or find) the tokenizer and the train/val token caches and decide the splits
        (:func:`plan_splits`). Runs on one process per node; a second call in the same process does nothing."""
        self._build_caches()

    def _build_caches(self) -> None:
        if self.plan is not None:
            return
        for split in ("train", "val"):
            cache = build_token_cache(self.source, self.tokenizer, split, self.cache_dir)
            log.info("%s tokens: %d (%s)", split, cache.num_tokens, "cache hit" if cache.hit else "tokenized")
            self.caches[split] = cache
        self.plan = plan_splits(self.source, self.caches["train"], self.caches["val"], self.seq_len)
        if self.plan.heldout:
            log.info(
                "validation: holding out the last %d of %d training tokens (%d window(s) of data.seq_len + 1), "
                "because %s; training windows come from the first %d tokens only",
                self.plan.heldout, self.caches["train"].num_tokens, (self.plan.heldout - 1) // self.seq_len,
                self.plan.reason, len(self.plan.train),
            )

    @property
    def heldout_tokens(self) -> int:
        """Tokens held out from the end of the training stream for validation (0: the source's own split)."""
        self._build_caches()
        return self.plan.heldout

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the token caches (building them first if ``prepare_data`` did not run in this process)."""
        self._build_caches()
        if self.train_dataset is None:
            self.train_dataset = TrainWindows(self.plan.train, self.seq_len, self.batch_size, self.seed)
            self.val_dataset = ValWindows(self.plan.val, self.seq_len, self.val_windows)

    # --- loaders ---------------------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer, or (0, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def start_step(self) -> int:
        """Step at which the training stream starts: ``global_step * accumulate_grad_batches`` (0 without a
        trainer), i.e. the number of batches this rank has consumed before."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

    def _loader_kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Infinite loader of ``[batch_size, seq_len + 1]`` batches; resumes where ``global_step`` says."""
        self.setup("fit")
        rank, world = self.rank_world()
        dataset = TrainWindows(self.plan.train, self.seq_len, self.batch_size, self.seed, rank=rank, world_size=world)
        return _ResumingLoader(dataset, self.start_step, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """Loader over this rank's share of the validation windows (``rank::world``), in order."""
        self.setup("validate")
        rank, world = self.rank_world()
        sampler = ShardSampler(len(self.val_dataset), rank, world)
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, sampler=sampler, **self._loader_kwargs())
