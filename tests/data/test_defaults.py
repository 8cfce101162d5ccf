"""One source of defaults: every value the data configs restate equals the constructor's own default."""

from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from bitflow.data import HFSource, StdlibSource, TextSource, TokenDataModule
from bitflow.data.sources import DEFAULT_VAL_FRACTION
from tests.helpers import compose


@pytest.mark.parametrize(
    ("option", "required"),
    [("stdlib", []), ("text", ["data.source.paths=[corpus.txt]"]), ("hf", ["data.source.path=json"])],
)
def test_config_values_equal_the_code_defaults(option: str, required: list[str]) -> None:
    data = compose([f"data={option}", *required]).data
    checked = []
    for prefix, node in (("data", data), ("data.source", data.source)):
        params = inspect.signature(get_class(node._target_)).parameters
        for key in node:
            if key.startswith("_") or isinstance(node[key], DictConfig) or OmegaConf.is_interpolation(node, key):
                continue
            assert key in params, f"{prefix}.{key} is not an argument of {node._target_}"
            default = params[key].default
            if default is not inspect.Parameter.empty:  # seq_len, batch_size, paths, path: no code default
                assert node[key] == default, f"{prefix}.{key}: config {node[key]!r} != code default {default!r}"
                checked.append(f"{prefix}.{key}")
    assert {"data.vocab_size", "data.val_windows", "data.source.val_fraction"} <= set(checked)


def test_every_source_has_the_same_val_fraction_default() -> None:
    for cls in (StdlibSource, TextSource, HFSource):
        assert inspect.signature(cls).parameters["val_fraction"].default == DEFAULT_VAL_FRACTION
    assert inspect.signature(TokenDataModule).parameters["vocab_size"].default == 8192
