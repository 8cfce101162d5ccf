"""Data pipeline throughput: tokenization once, then training batches from the memory-mapped cache.

On the stdlib corpus with a cached tokenizer (trained on the first run and kept under ``$BITFLOW_CACHE``):
the train split is tokenized into a fresh temporary cache (tokens/s and MB/s of text), then the train
DataLoader is iterated for a number of batches with 0 and 2 workers (tokens/s counts ``batch x seq_len``
tokens per batch, the way training throughput counts them). Compare with the training tokens/s: the data
pipeline should be >= 50x faster, so the model never waits for it.

Run: ``python -m bitflow.bench.data [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from bitflow.data.cache import build_token_cache
from bitflow.data.datamodule import TokenDataModule, default_cache_dir
from bitflow.data.sources import StdlibSource
from bitflow.data.tokenizer import build_tokenizer


def _loader_row(dm: TokenDataModule, workers: int, batches: int) -> dict:
    dm.num_workers = workers
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # start the workers before timing
    t0 = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    seconds = time.perf_counter() - t0
    tokens = batches * dm.batch_size * dm.seq_len
    return {
        "bench": "data",
        "case": f"train loader, {workers} workers",
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds),
        "note": f"{batches} batches of {dm.batch_size} x {dm.seq_len}",
    }


def run(quick: bool = False) -> list[dict]:
    """Measure tokenizer training (only if not cached), tokenization and train-loader throughput; returns one
    row per measurement and prints a table. ``quick``: 200 stdlib files, vocab 2048, short loops."""
    if quick:
        source, vocab, seq_len, batch, batches = StdlibSource(max_files=200), 2048, 256, 16, 50
    else:
        source, vocab, seq_len, batch, batches = StdlibSource(), 8192, 1024, 32, 300
    cache_dir = default_cache_dir()
    corpus_bytes = sum(path.stat().st_size for _, path in source.split_files("train"))
    rows = []

    t0 = time.perf_counter()
    tokenizer, hit = build_tokenizer(source, vocab, cache_dir)
    if not hit:
        rows.append(
            {
                "bench": "data",
                "case": "tokenizer training (first run only)",
                "tokens": None,
                "seconds": round(time.perf_counter() - t0, 2),
                "tokens_per_s": None,
                "note": f"byte-level BPE, vocab {tokenizer.get_vocab_size()}, {corpus_bytes / 1e6:.1f} MB",
            }
        )

    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache, so the tokenization is really timed
        cache = build_token_cache(source, tokenizer, "train", tmp)
    rows.append(
        {
            "bench": "data",
            "case": "tokenize train split (once)",
            "tokens": cache.num_tokens,
            "seconds": round(cache.seconds, 3),
            "tokens_per_s": round(cache.num_tokens / cache.seconds),
            "note": f"{corpus_bytes / 1e6 / cache.seconds:.1f} MB/s of text, {cache.num_documents} files, "
            f"{corpus_bytes / cache.num_tokens:.2f} bytes/token",
        }
    )

    dm = TokenDataModule(source, seq_len=seq_len, batch_size=batch, vocab_size=vocab, cache_dir=str(cache_dir))
    dm.setup("fit")
    for workers in (0, 2):
        rows.append(_loader_row(dm, workers, batches))
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    print("data pipeline throughput (stdlib corpus)")
    print(f"{'case':<38} {'tokens/s':>14} {'seconds':>9}  note")
    for r in rows:
        tps = f"{r['tokens_per_s']:,}" if r["tokens_per_s"] is not None else "-"
        print(f"{r['case']:<38} {tps:>14} {r['seconds']:>9}  {r['note']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 stdlib files, a few seconds")
    run(quick=parser.parse_args().quick)
