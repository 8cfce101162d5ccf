"""DataModule: split isolation, validation sharding, deterministic and resumable training stream, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bitflow.data import ShardSampler, StdlibSource, TextSource, TokenDataModule, TrainWindows, ValWindows
from bitflow.data.datamodule import _splitmix64, window_starts

SEQ_LEN, BATCH = 32, 4  # the shape of the session `datamodule` fixture (checked below)


def take(loader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n))


def test_splitmix64_reference_value() -> None:
    # first output of the reference splitmix64 generator seeded with 0 (Vigna's splitmix64.c)
    assert int(_splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_window_starts_range_and_independence_of_batching() -> None:
    ids = np.arange(1000, dtype=np.uint64)
    starts = window_starts(ids, seed=3, num_starts=97)
    assert starts.min() >= 0 and starts.max() < 97 and len(set(starts.tolist())) == 97  # all reachable
    np.testing.assert_array_equal(window_starts(ids[500:], 3, 97), starts[500:])  # per-sample, not per-batch
    assert not np.array_equal(window_starts(ids, 4, 97), starts)


def test_batches_and_windows_shapes(datamodule: TokenDataModule) -> None:
    assert (datamodule.seq_len, datamodule.batch_size) == (SEQ_LEN, BATCH)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == torch.int64
    val = next(iter(datamodule.val_dataloader()))
    assert val.shape == (BATCH, SEQ_LEN + 1) and val.dtype == torch.int64
    assert int(batch.max()) < datamodule.vocab_size


def test_windows_never_cross_the_split(datamodule: TokenDataModule) -> None:
    train, val = datamodule.caches["train"].load(), datamodule.caches["val"].load()
    ds = datamodule.train_dataset
    for k in range(50):
        starts = ds.sample_starts(k)
        assert starts.max() + SEQ_LEN + 1 <= len(train)
        expected = np.stack([train[s : s + SEQ_LEN + 1] for s in starts]).astype(np.int64)
        np.testing.assert_array_equal(ds.batch(k).numpy(), expected)
    vds = datamodule.val_dataset
    assert len(vds) == (len(val) - 1) // SEQ_LEN
    for i in range(len(vds)):
        np.testing.assert_array_equal(vds[i].numpy(), val[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])


def test_split_isolation_by_content(tmp_path: Path, write_files) -> None:
    # train text uses only letters, validation text only digits: any leak shows up in the decoded windows
    root = write_files(
        {
            "train/a.txt": "abc def ghi jkl " * 50,
            "train/b.txt": "mno pqr stu vwx " * 50,
            "val/v.txt": "0123 4567 89 " * 30,
        }
    )
    src = TextSource(str(root / "train"), val_paths=str(root / "val"))
    dm = TokenDataModule(src, seq_len=16, batch_size=8, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    tok = dm.tokenizer
    for batch in take(dm.train_dataloader(), 20):
        for row in batch.tolist():
            assert not any(ch.isdigit() for ch in tok.decode(row))
    for batch in dm.val_dataloader():
        for row in batch.tolist():
            assert not any(ch.isalpha() for ch in tok.decode(row))


def test_val_sharding_two_ranks_two_workers_covers_each_window_once(datamodule: TokenDataModule) -> None:
    vds = ValWindows(datamodule.caches["val"], SEQ_LEN)
    assert len(vds) >= 7
    seen = []
    for rank in range(2):
        sampler = ShardSampler(len(vds), rank=rank, world_size=2)
        assert list(sampler) == list(range(rank, len(vds), 2))
        loader = DataLoader(vds, batch_size=3, sampler=sampler, num_workers=2)
        rows = [tuple(r) for b in loader for r in b.tolist()]
        assert len(rows) == len(sampler)
        seen += rows
    assert sorted(seen) == sorted(tuple(vds[i].tolist()) for i in range(len(vds)))


def test_val_windows_cap_evenly_spaced(datamodule: TokenDataModule) -> None:
    full = ValWindows(datamodule.caches["val"], SEQ_LEN)
    capped = ValWindows(datamodule.caches["val"], SEQ_LEN, max_windows=4)
    n = len(full)
    assert len(capped) == 4
    assert capped.offsets.tolist() == [(j * n) // 4 * SEQ_LEN for j in range(4)]
    assert len(ValWindows(datamodule.caches["val"], SEQ_LEN, max_windows=10**6)) == n


def test_train_stream_deterministic_resumable_worker_independent(datamodule: TokenDataModule) -> None:
    cache = datamodule.caches["train"]

    def stream(start: int = 0, workers: int = 0, rank: int = 0, world: int = 1, n: int = 8):
        ds = TrainWindows(cache, SEQ_LEN, BATCH, seed=7, rank=rank, world_size=world, start_step=start)
        return torch.stack(take(DataLoader(ds, batch_size=None, num_workers=workers), n))

    full = stream(n=8)
    torch.testing.assert_close(stream(n=8), full)  # deterministic
    torch.testing.assert_close(stream(start=3, n=5), full[3:])  # resume = tail of the uninterrupted stream
    torch.testing.assert_close(stream(workers=2, n=8), full)  # worker count does not change the order
    # two ranks interleave the single-rank stream: rank r gets global batches r, r+2, ...; none shared
    r0, r1 = stream(rank=0, world=2, n=4, workers=2), stream(rank=1, world=2, n=4)
    torch.testing.assert_close(r0, full[0::2])
    torch.testing.assert_close(r1, full[1::2])
    rows0 = {tuple(r) for r in r0.reshape(-1, SEQ_LEN + 1).tolist()}
    rows1 = {tuple(r) for r in r1.reshape(-1, SEQ_LEN + 1).tolist()}
    assert rows0.isdisjoint(rows1) and len(rows0) == 4 * BATCH
    other_seed = TrainWindows(cache, SEQ_LEN, BATCH, seed=8).batch(0)
    assert not torch.equal(other_seed, full[0])


class _Recorder(L.LightningModule):
    """The smallest real LightningModule: records every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return self.w.sum() * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: TokenDataModule, max_steps: int, ckpt_path=None, **trainer_kw) -> tuple[_Recorder, L.Trainer]:
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kw,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def test_lightning_resume_and_epochs_continue_the_stream(datamodule: TokenDataModule, tmp_path: Path) -> None:
    ds = datamodule.train_dataset
    expected = [ds.batch(k) for k in range(12)]
    # 12 batches = 6 optimizer steps x 2 accumulated; epochs of 4 batches must not replay the stream
    model, _ = _fit(datamodule, 6, accumulate_grad_batches=2, limit_train_batches=4)
    assert len(model.seen) == 12
    for got, want in zip(model.seen, expected, strict=True):
        torch.testing.assert_close(got, want)
    # stop after 2 optimizer steps, then resume from the checkpoint: the run continues at batch 4
    _, trainer = _fit(datamodule, 2, accumulate_grad_batches=2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed, _ = _fit(datamodule, 4, ckpt_path=tmp_path / "step2.ckpt", accumulate_grad_batches=2)
    assert len(resumed.seen) == 4
    for got, want in zip(resumed.seen, expected[4:8], strict=True):
        torch.testing.assert_close(got, want)


def test_rank_world_and_start_without_trainer(datamodule: TokenDataModule) -> None:
    dm = TokenDataModule(datamodule.source, seq_len=SEQ_LEN, batch_size=BATCH, vocab_size=320)
    assert dm.rank_world() == (0, 1) and dm.start_step() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, r"^data.seq_len=0 is not allowed: give an integer >= 1$"),
        ({"seq_len": -4}, r"data.seq_len=-4 "),
        ({"seq_len": 8.5}, r"data.seq_len=8.5 "),
        ({"batch_size": 0}, r"data.batch_size=0 .*integer >= 1"),
        ({"vocab_size": 200}, r"data.vocab_size=200 .*minimum is 257"),
        ({"val_windows": 0}, r"data.val_windows=0 .*integer >= 1 or null"),
        ({"val_batch_size": 0}, r"data.val_batch_size=0 "),
        ({"num_workers": -1}, r"data.num_workers=-1 .*integer >= 0"),
    ],
)
def test_bad_arguments(stdlib_small: StdlibSource, kwargs: dict, match: str) -> None:
    args = {"seq_len": 8, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenDataModule(stdlib_small, **args)


def test_source_must_be_a_source() -> None:
    with pytest.raises(TypeError, match="data.source must be a bitflow.data.sources.Source"):
        TokenDataModule({"kind": "stdlib"}, seq_len=8, batch_size=2)


def test_missing_tokenizer_path_names_the_key(stdlib_small: StdlibSource, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer_path='.*nope.json' is not allowed: no such file"):
        TokenDataModule(stdlib_small, seq_len=8, batch_size=2, tokenizer_path=str(tmp_path / "nope.json"))


def test_too_short_explicit_splits_error(tmp_path: Path, write_files) -> None:
    root = write_files({"train.txt": "short text " * 5, "val.txt": "tiny"})
    src = TextSource(str(root / "train.txt"), val_paths=str(root / "val.txt"))
    dm = TokenDataModule(src, seq_len=20, batch_size=2, vocab_size=260, cache_dir=str(tmp_path))
    # named validation data is never replaced by a held-out tail: too short is an error naming both keys
    with pytest.raises(ValueError, match=r"data.seq_len=20 .*data.source.val_paths=\[.*val.txt'\] has \d+ tokens"):
        dm.setup()
    root = write_files({"val2.txt": "a long enough validation text " * 20})
    src = TextSource(str(root / "train.txt"), val_paths=str(root / "val2.txt"))
    dm = TokenDataModule(src, seq_len=100, batch_size=2, vocab_size=260, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.seq_len=100 .*training split .* has \d+ tokens.*= 101"):
        dm.setup()


def test_hydra_instantiate(cache_dir: Path, write_files) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = write_files({"a.txt": "some text for training " * 40, "b.txt": "more text here " * 40})
    cfg = OmegaConf.create(
        {
            "_target_": "bitflow.data.TokenDataModule",
            "source": {"_target_": "bitflow.data.build_source", "kind": "text", "paths": [str(root / "*.txt")]},
            "seq_len": 8,
            "batch_size": 2,
            "vocab_size": 270,
            "cache_dir": str(cache_dir),
        }
    )
    dm = instantiate(cfg)
    assert isinstance(dm.source, TextSource) and [k for k, _ in dm.source.files] == ["a.txt", "b.txt"]
    stdlib = instantiate(OmegaConf.create({"_target_": "bitflow.data.StdlibSource", "max_files": 60}))
    assert stdlib.fingerprint() == StdlibSource(max_files=60).fingerprint()


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stdlib_small) -> None:
    from bitflow.data.datamodule import default_cache_dir

    monkeypatch.setenv("BITFLOW_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    assert TokenDataModule(stdlib_small, seq_len=8, batch_size=2).cache_dir == tmp_path / "env-cache"
    monkeypatch.delenv("BITFLOW_CACHE")
    assert default_cache_dir() == Path("~/.cache/bitflow").expanduser()
