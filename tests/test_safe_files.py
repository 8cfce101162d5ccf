"""Safe and robust files: checkpoints load with ``weights_only=True`` only, corrupted files are found by their
manifest, shared caches are built once by concurrent processes, unwritable outputs fail clearly."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitflow.checkpoint import AtomicCheckpointIO, UnsafeCheckpointError, atomic_torch_save, read_checkpoint
from bitflow.config import ConfigError
from bitflow.io import manifest_path, verify_manifest
from tests.helpers import compose


class MakesMarker:
    """Unpickling this runs ``Path(marker).touch()``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "bitflow": {"model_config": {}}, "payload": MakesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_a_checkpoint_crafted_to_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load {path}.*nothing in it was run"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):  # Lightning's resume path
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does what it claims (so the refusal above is what protects)
    assert marker.exists()


def test_resuming_from_a_crafted_checkpoint_fails_before_training(tiny_overrides, tmp_path: Path):
    from bitflow.cli import prepare_config

    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="refused to load"):
        prepare_config(compose([*tiny_overrides, f"ckpt_path={path}"]))
    assert not marker.exists()


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_or_truncated_checkpoint_is_reported_with_its_path(tmp_path: Path):
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.arange(4096.0)}, "bitflow": {"model_config": {}}}, path)
    assert json.loads(manifest_path(path).read_text())["size"] == path.stat().st_size
    assert read_checkpoint(path)["state_dict"]["w"][5] == 5
    _flip_middle_byte(path)  # torch.load alone would load this silently
    with pytest.raises(ValueError, match=rf"corrupted checkpoint: {path} does not match the sha256"):
        read_checkpoint(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{path} is 1000 bytes, its manifest says \d+: truncated"):
        read_checkpoint(path)


def test_a_corrupted_token_cache_and_tokenizer_are_rebuilt(tmp_path: Path, caplog):
    from bitflow.data.cache import build_token_cache
    from bitflow.data.sources import build_source
    from bitflow.data.tokenizer import build_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 20)
    source = build_source("text", paths=str(corpus))
    tok, hit = build_tokenizer(source, 300, tmp_path / "cache")
    cache = build_token_cache(source, tok, "train", tmp_path / "cache")
    assert not hit and not cache.hit
    tokens = cache.load().copy()
    _flip_middle_byte(cache.path)
    again = build_token_cache(source, tok, "train", tmp_path / "cache")
    assert not again.hit  # found corrupted, tokenized again
    assert f"token cache: {cache.path} does not match the sha256" in caplog.text
    assert (again.load() == tokens).all()

    (tok_file,) = [p for p in (tmp_path / "cache").glob("tokenizer-*.json") if not p.name.endswith(".manifest.json")]
    tok_file.write_text(tok_file.read_text().replace('"<|endoftext|>"', '"<|endoftexx|>"', 1))
    rebuilt, hit = build_tokenizer(source, 300, tmp_path / "cache")
    assert not hit and f"tokenizer cache: {tok_file} does not match" in caplog.text
    assert rebuilt.to_str() == tok.to_str()
    assert verify_manifest(tok_file) is None


BUILD = textwrap.dedent("""
    import json, sys
    from bitflow.data.cache import build_token_cache
    from bitflow.data.sources import build_source
    from bitflow.data.tokenizer import build_tokenizer
    source = build_source("text", paths=sys.argv[1])
    tok, hit = build_tokenizer(source, 2000, sys.argv[2])
    caches = [build_token_cache(source, tok, split, sys.argv[2]) for split in ("train", "val")]
    print(json.dumps({"tokenizer_hit": hit, "cache_hits": [c.hit for c in caches],
                      "tokens": [int(c.load().sum()) for c in caches]}))
""")


@pytest.mark.slow
def test_two_processes_starting_at_once_build_the_shared_caches_once(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(300):
        (corpus / f"{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 911}" for j in range(400)))
    cmd = [sys.executable, "-c", BUILD, str(corpus), str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["tokenizer_hit"] for r in results) == [False, True]  # trained once
    assert sorted(tuple(r["cache_hits"]) for r in results) == [(False, False), (True, True)]  # tokenized once
    assert results[0]["tokens"] == results[1]["tokens"]  # both read the whole files


def test_an_unwritable_output_dir_fails_before_training(tiny_overrides, tmp_path: Path):
    from bitflow.cli import prepare_config

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"paths.output_dir='.*a-file/run' cannot be written \(.*a-file is not a directory\)"):
        prepare_config(compose([*tiny_overrides, f"paths.output_dir={blocker / 'run'}"]))


class DiskFull:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path: Path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 3}, path)
    with pytest.raises(OSError, match=rf"could not write checkpoint {path}: No space left on device; the previous "
                                      "file is intact"):
        atomic_torch_save({"global_step": 6, "x": DiskFull()}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 3}
    assert verify_manifest(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.manifest.json"]
