"""Text classification data: labelled documents -> bag-of-tokens features -> a DataModule of example batches.

* ``dataset: stdlib`` (offline): each ``.py`` file of the standard library inside a package, labelled by its
  top-level package (``email/mime/text.py`` -> ``email``); files directly in the stdlib root have no package and are
  left out. Classes with fewer than ``min_files`` files are dropped, larger ones capped at ``max_per_class`` files
  (a deterministic hash order), and a file is in the validation split when ``sha1("cls:" + path)`` maps below
  ``val_fraction``: the same on every machine with the same Python.
* ``dataset: <name>`` (online, or local ``data_files``): any Hugging Face text-classification dataset through
  ``datasets.load_dataset``, its ``text_column`` and integer ``label_column``.

Features: per document, the counts of each token id of the tokenizer (the corpus's byte-level BPE, as the
language-model tasks use), ``log(1 + count)``, each row scaled to unit L2 norm. Cached in ``cache_dir`` by a
fingerprint of the documents, labels and tokenizer (written atomically).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset

from bitflow.data.cache import default_cache_dir, tokenizer_hash
from bitflow.data.datamodule import window_starts
from bitflow.data.sources import HFSource, StdlibSource, check_fraction, check_int, hash_fraction, stable_hash
from bitflow.data.tokenizer import build_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "ClassificationData", "ExampleBatches", "TextClassificationDataModule", "bag_of_tokens", "check_labels",
    "stdlib_labelled_files",
]


@dataclass(frozen=True)
class LabelledFile:
    key: str  # path relative to the stdlib root, posix
    path: Path
    label: str  # top-level package


def stdlib_labelled_files(
    min_files: int = 20, max_per_class: int | None = 120, root: str | None = None
) -> list[LabelledFile]:
    """The stdlib ``.py`` files inside a package, labelled by the top-level package, classes with at least
    ``min_files`` files, each capped at ``max_per_class`` (hash order); sorted by path."""
    check_int("data.min_files", min_files, 1)
    check_int("data.max_per_class", max_per_class, 1, allow_none=True)
    by_class: dict[str, list[LabelledFile]] = {}
    for key, path in StdlibSource(root=root).files:
        parts = key.split("/")
        if len(parts) > 1:
            by_class.setdefault(parts[0], []).append(LabelledFile(key, path, parts[0]))
    out = []
    for files in by_class.values():
        if len(files) < min_files:
            continue
        files = sorted(files, key=lambda f: hash_fraction("cap:" + f.key))[:max_per_class]
        out += files
    return sorted(out, key=lambda f: f.key)


def bag_of_tokens(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """[N, vocab] float32: ``log(1 + count)`` of each token id per text, rows scaled to unit L2 norm."""
    vocab = tokenizer.get_vocab_size()
    out = np.zeros((len(texts), vocab), dtype=np.float32)
    for start in range(0, len(texts), 256):
        for i, enc in enumerate(tokenizer.encode_batch(list(texts[start : start + 256])), start):
            ids, counts = np.unique(np.asarray(enc.ids, dtype=np.int64), return_counts=True)
            out[i, ids] = np.log1p(counts)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


def check_labels(labels: np.ndarray, train: np.ndarray, origin: str, n_classes: int) -> None:
    """Clear errors before training: fewer than 2 classes, or training examples without a label (< 0)."""
    if n_classes < 2:
        raise ValueError(f"{origin} has {n_classes} class(es); classification needs at least 2")
    unlabelled = int((labels[train] < 0).sum())
    if unlabelled:
        raise ValueError(
            f"{origin}: {unlabelled} training example(s) have no label (label < 0); every example in the "
            "training split (mask) needs a label"
        )
    present = np.unique(labels[train][labels[train] >= 0])
    if len(present) < 2:
        raise ValueError(f"{origin}: the training split holds {len(present)} class(es); it needs at least 2")


@dataclass
class ClassificationData:
    """Features, labels and the split of a classification dataset."""

    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N] int64
    is_val: np.ndarray  # [N] bool
    classes: list[str]
    origin: str

    @property
    def majority_baseline(self) -> float:
        """Validation accuracy of predicting the most frequent training class."""
        train = self.labels[~self.is_val]
        majority = np.bincount(train[train >= 0]).argmax()
        return float((self.labels[self.is_val] == majority).mean())

    def summary(self) -> str:
        return (f"{self.origin}: {len(self.labels)} examples ({int(self.is_val.sum())} validation), "
                f"{len(self.classes)} classes, {self.features.shape[1]} features, majority-class validation "
                f"accuracy {self.majority_baseline:.3f}")


def _cached(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from bitflow.io import atomic_output

    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    arrays = build()
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return arrays


def load_stdlib_classes(
    tokenizer: Tokenizer, cache_dir: Path, min_files: int, max_per_class: int | None, val_fraction: float
) -> ClassificationData:
    """The stdlib text-classification set (see the module docstring), features cached."""
    files = stdlib_labelled_files(min_files, max_per_class)
    classes = sorted({f.label for f in files})
    key = stable_hash({"kind": "stdlib-classes", "files": [[f.key, f.label, f.path.stat().st_size] for f in files],
                       "tokenizer": tokenizer_hash(tokenizer), "features": "log1p-l2"})
    arrays = _cached(
        cache_dir / f"classes-{key}.npz",
        lambda: {"features": bag_of_tokens([f.path.read_text("utf-8", errors="replace") for f in files], tokenizer)},
    )
    labels = np.array([classes.index(f.label) for f in files], dtype=np.int64)
    is_val = np.array([hash_fraction("cls:" + f.key) < val_fraction for f in files])
    origin = f"the stdlib package-classification set (data.min_files={min_files}, data.max_per_class={max_per_class})"
    return ClassificationData(arrays["features"], labels, is_val, classes, origin)


class ExampleBatches(IterableDataset):
    """Infinite stream of index batches ``[batch_size]`` into ``n`` examples, drawn with replacement as a pure
    function of ``(seed, sample index)`` (:func:`~bitflow.data.datamodule.window_starts`), so a resumed run
    continues exactly; ``start_step`` is set by the resuming loader."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step

    def batch(self, step: int) -> torch.Tensor:
        ids = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.uint64)
        return torch.from_numpy(window_starts(ids, self.seed, self.n))

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class _Gather(IterableDataset):
    """``(features[idx], labels[idx])`` for each index batch of an :class:`ExampleBatches`."""

    def __init__(self, batches: ExampleBatches, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.batches, self.features, self.labels = batches, features, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.batches:
            yield self.features[idx], self.labels[idx]


class _Resuming(DataLoader):
    def __init__(self, dataset: _Gather, start_step_fn: Callable[[], int]) -> None:
        super().__init__(dataset, batch_size=None)
        self.start_step_fn = start_step_fn

    def __iter__(self):
        self.dataset.batches.start_step = self.start_step_fn()
        return super().__iter__()


class TextClassificationDataModule(L.LightningDataModule):
    """Bag-of-tokens text classification: training batches ``(features [B, F], labels [B])`` drawn with
    replacement (exact on resume), validation over every validation example in order.

    Args:
        dataset: ``stdlib`` (offline) or a Hugging Face dataset name / builder (``json``, ``csv`` with
            ``data_files``).
        batch_size: training examples per batch.
        vocab_size: the BPE's vocabulary = the number of features (ignored with ``tokenizer_path``).
        tokenizer_path: a ``tokenizer.json`` to use instead of the one trained on the corpus.
        tokenizer_max_files: train the stdlib BPE on this many files (``data.source.max_files`` of data=stdlib;
            the same tokenizer and cache entry); null = all.
        cache_dir: tokenizer and feature cache.
        seed: seed of the batch draws.
        min_files, max_per_class, val_fraction: the stdlib set (see the module docstring).
        hf_config, text_column, label_column, train_split, val_split, data_files, max_examples: the HF set.
    """

    def __init__(
        self,
        dataset: str = "stdlib",
        batch_size: int = 32,
        vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        tokenizer_max_files: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        min_files: int = 20,
        max_per_class: int | None = 120,
        val_fraction: float = 0.2,
        hf_config: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str = "test",
        data_files: dict | str | None = None,
        max_examples: int | None = None,
        val_batch_size: int = 256,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"data.dataset={dataset!r} is not allowed; allowed: stdlib or a Hugging Face dataset name")
        check_int("data.batch_size", batch_size, 1)
        check_int("data.seed", seed, 0)
        check_int("data.min_files", min_files, 1)
        check_int("data.tokenizer_max_files", tokenizer_max_files, 1, allow_none=True)
        self.tokenizer_max_files = tokenizer_max_files
        check_int("data.max_per_class", max_per_class, 1, allow_none=True)
        check_int("data.max_examples", max_examples, 1, allow_none=True)
        check_int("data.val_batch_size", val_batch_size, 1)
        self.val_fraction = check_fraction("data.val_fraction", val_fraction)
        self.dataset, self.batch_size, self.requested_vocab_size = dataset, batch_size, vocab_size
        self.tokenizer_path = tokenizer_path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.seed, self.min_files, self.max_per_class = seed, min_files, max_per_class
        self.hf = dict(name=hf_config, text_column=text_column, label_column=label_column, train_split=train_split,
                       val_split=val_split, data_files=data_files, max_examples=max_examples)
        self.val_batch_size = val_batch_size
        self._tokenizer: Tokenizer | None = None
        self.data: ClassificationData | None = None

    # --- tokenizer and data ---------------------------------------------------------------------------------
    def _hf_source(self) -> HFSource:
        h = self.hf
        return HFSource(self.dataset, h["name"], split=h["train_split"], text_column=h["text_column"],
                        data_files=h["data_files"], max_documents=h["max_examples"])

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                stdlib = self.dataset == "stdlib"
                source = StdlibSource(max_files=self.tokenizer_max_files) if stdlib else self._hf_source()
                self._tokenizer, _ = build_tokenizer(source, self.requested_vocab_size, self.cache_dir)
        return self._tokenizer

    @property
    def tokenizer_json(self) -> str:
        return self.tokenizer.to_str()

    def prepare_data(self) -> None:
        """Tokenizer, features and labels (cached); clear errors for missing columns, labels, or one class."""
        if self.data is not None:
            return
        if self.dataset == "stdlib":
            self.data = load_stdlib_classes(self.tokenizer, self.cache_dir, self.min_files, self.max_per_class,
                                            self.val_fraction)
        else:
            self.data = self._load_hf()
        d = self.data
        check_labels(d.labels, ~d.is_val, d.origin, len(d.classes))
        if not d.is_val.any():
            raise ValueError(f"{d.origin} has no validation example; raise data.val_fraction")
        log.info("%s", d.summary())

    def _load_hf(self) -> ClassificationData:
        import datasets

        h = self.hf
        origin = f"the Hugging Face dataset data.dataset={self.dataset!r}"
        try:
            splits = {s: datasets.load_dataset(self.dataset, h["name"], split=h[f"{s}_split"],
                                               data_files=h["data_files"]) for s in ("train", "val")}
        except Exception as e:  # offline, unknown name, missing split: one clear message
            raise ValueError(
                f"{origin} could not be loaded ({type(e).__name__}: {e}); it needs a network connection (or "
                f"local data.data_files) and the splits data.train_split={h['train_split']!r}, "
                f"data.val_split={h['val_split']!r}; offline, use data.dataset=stdlib"
            ) from None
        texts, labels, is_val = [], [], []
        classes: list[str] | None = None
        for split, ds in splits.items():
            for key in ("text_column", "label_column"):
                if h[key] not in ds.column_names:
                    raise ValueError(f"data.{key}={h[key]!r} is not allowed: {origin} split {split!r} has no "
                                     f"such column; available columns: {sorted(ds.column_names)}")
            if h["max_examples"] is not None:
                ds = ds.select(range(min(h["max_examples"], len(ds))))
            feature = ds.features.get(h["label_column"]) if ds.features is not None else None
            if classes is None and getattr(feature, "names", None):
                classes = list(feature.names)
            column = ds[h["label_column"]]
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in column):
                raise ValueError(f"data.label_column={h['label_column']!r}: {origin} has non-integer labels; "
                                 "classification needs integer class ids (a ClassLabel column)")
            texts += ["" if t is None else str(t) for t in ds[h["text_column"]]]
            labels += list(column)
            is_val += [split == "val"] * len(ds)
        y = np.asarray(labels, dtype=np.int64)
        n_classes = int(y.max()) + 1 if len(y) else 0
        classes = classes or [str(i) for i in range(n_classes)]
        return ClassificationData(bag_of_tokens(texts, self.tokenizer), y, np.asarray(is_val, dtype=bool), classes,
                                  origin)

    @property
    def n_classes(self) -> int:
        self.prepare_data()
        return len(self.data.classes)

    @property
    def n_features(self) -> int:
        self.prepare_data()
        return int(self.data.features.shape[1])

    # --- loaders -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def start_step(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.global_step) * int(trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        self.prepare_data()
        d = self.data
        train = ~d.is_val
        x, y = torch.from_numpy(d.features[train]), torch.from_numpy(d.labels[train])
        return _Resuming(_Gather(ExampleBatches(len(y), self.batch_size, self.seed), x, y), self.start_step)

    def val_dataloader(self) -> DataLoader:
        self.prepare_data()
        d = self.data
        x, y = torch.from_numpy(d.features[d.is_val]), torch.from_numpy(d.labels[d.is_val])
        return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=self.val_batch_size)

