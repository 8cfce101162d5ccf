"""The BitLinear benchmark runs (quick mode), reports every variant, and survives a missing PyPI bitlinear."""

import importlib.util
import sys

import pytest

from bitflow.bench import bitlinear as bench


def test_quick_run_rows(capsys):
    rows = bench.run_stack(quick=True)
    layers = [r["layer"] for r in rows]
    assert layers == ["nn.Linear", "BitLinear absmean", "BitLinear absmedian", "bitlinear (PyPI)"]
    assert rows[0]["ratio_vs_linear"] == 1.0
    for r in rows[:3]:
        assert r["ms_per_step"] > 0 and r["ratio_vs_linear"] > 0
        assert r["bench"] == "bitlinear"
    seed = rows[3]
    if importlib.util.find_spec("bitlinear") is not None:
        assert seed["ms_per_step"] > 0
    else:
        assert seed["ms_per_step"] is None and "not installed" in seed["note"]
    out = capsys.readouterr().out
    assert "BitLinear absmean" in out and "vs Linear" in out


def test_missing_seed_package_gives_not_installed_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitlinear", None)  # makes `import bitlinear` raise ImportError
    factory, note = bench._seed_authors_layer()
    assert factory is None and "not installed" in note


@pytest.mark.slow
def test_quick_layer_table_has_every_variant_eager_and_compiled(capsys):
    rows = bench.run_layers(quick=True, threads=(1,))
    assert [(r["layer"], r["compiled"]) for r in rows] == [
        (name, compiled) for compiled in (False, True) for name in bench.LAYERS
    ]
    assert all(r["vs nn.Linear"] > 0 and r["threads"] == 1 for r in rows)
    assert rows[0]["vs nn.Linear"] == 1.0
    assert "CPU: " in capsys.readouterr().out
