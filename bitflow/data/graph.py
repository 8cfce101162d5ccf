"""Node classification data: one graph (features, edges, labels, train/validation masks) -> a DataModule whose
training loader yields the whole graph every step (full-batch training, as for SGC and GCN) and whose validation
loader yields it once.

* ``dataset: stdlib`` (offline): the modules of the labelled stdlib packages
  (:func:`~bitflow.data.classification.stdlib_labelled_files`) are the nodes, ``import`` statements between them
  (absolute and relative, resolved with :mod:`ast`) the undirected edges, bag-of-tokens of the source the
  features, the top-level package the label; a node is in the validation mask when ``sha1("node:" + path)`` maps
  below ``val_fraction``.
* ``dataset: Cora | CiteSeer | PubMed`` (online once, then cached under ``root``): the Planetoid citation graphs
  through torch-geometric, with their standard public split.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from bitflow.data.cache import default_cache_dir, tokenizer_hash
from bitflow.data.classification import _cached, bag_of_tokens, check_labels, stdlib_labelled_files
from bitflow.data.sources import StdlibSource, check_fraction, check_int, hash_fraction, stable_hash
from bitflow.data.tokenizer import build_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["PLANETOID", "Graph", "NodeClassificationDataModule", "import_edges", "stdlib_graph"]

PLANETOID = ("Cora", "CiteSeer", "PubMed")
Graph = dict[str, torch.Tensor]  # x [N, F], edge_index [2, E], y [N], train_mask [N], val_mask [N]


def module_name(key: str) -> str:
    """``email/mime/text.py`` -> ``email.mime.text``; ``email/__init__.py`` -> ``email``."""
    parts = key[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, name: str, is_package: bool) -> list[list[str]]:
    """For each import of ``source`` (module ``name``): the module names it may refer to, most specific first
    (``from a.b import c`` -> ``a.b.c, a.b, a``; relative imports resolved against the package)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are test fixtures with bad syntax on purpose
        return []
    package = name if is_package else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                up = parts[: len(parts) - (node.level - 1)] if node.level - 1 <= len(parts) else []
                base = ".".join([*up, base] if base else up)
            targets += [f"{base}.{a.name}" if base else a.name for a in node.names]
    out = []
    for t in targets:
        parts = t.split(".")
        out.append([".".join(parts[:i]) for i in range(len(parts), 0, -1)])
    return out


def import_edges(names: list[str], sources: list[str], keys: list[str]) -> np.ndarray:
    """[2, E] undirected edges (both directions, no self-loops, no duplicates) between modules ``names`` where one
    imports the other; an import resolves to the most specific module name that is a node."""
    index = {n: i for i, n in enumerate(names)}
    pairs = set()
    for i, (src, key) in enumerate(zip(sources, keys, strict=True)):
        for candidates in _imports(src, names[i], key.endswith("__init__.py")):
            j = next((index[c] for c in candidates if c in index), None)
            if j is not None and j != i:
                pairs.add((min(i, j), max(i, j)))
    if not pairs:
        return np.zeros((2, 0), dtype=np.int64)
    e = np.array(sorted(pairs), dtype=np.int64).T
    return np.concatenate([e, e[::-1]], axis=1)


def stdlib_graph(tokenizer, cache_dir: Path, min_files: int, max_per_class: int | None, val_fraction: float,
                 ) -> tuple[Graph, list[str], str]:
    """The stdlib import graph (see the module docstring): ``(graph, class names, origin)``, cached."""
    files = stdlib_labelled_files(min_files, max_per_class)
    classes = sorted({f.label for f in files})
    key = stable_hash({"kind": "stdlib-graph", "files": [[f.key, f.label, f.path.stat().st_size] for f in files],
                       "tokenizer": tokenizer_hash(tokenizer), "features": "log1p-l2", "edges": 1})

    def build() -> dict[str, np.ndarray]:
        texts = [f.path.read_text("utf-8", errors="replace") for f in files]
        names = [module_name(f.key) for f in files]
        return {"features": bag_of_tokens(texts, tokenizer), "edges": import_edges(names, texts, [f.key for f in files])}

    arrays = _cached(cache_dir / f"graph-{key}.npz", build)
    y = torch.tensor([classes.index(f.label) for f in files], dtype=torch.long)
    val = torch.tensor([hash_fraction("node:" + f.key) < val_fraction for f in files])
    graph = {"x": torch.from_numpy(arrays["features"]), "edge_index": torch.from_numpy(arrays["edges"]), "y": y,
             "train_mask": ~val, "val_mask": val}
    origin = f"the stdlib import graph (data.min_files={min_files}, data.max_per_class={max_per_class})"
    return graph, classes, origin


def planetoid(name: str, root: Path) -> tuple[Graph, list[str], str]:
    """A Planetoid citation graph (Yang et al. 2016) through torch-geometric, its public split."""
    from bitflow.models.gnn import require_pyg

    require_pyg()
    from torch_geometric.datasets import Planetoid

    try:
        data = Planetoid(str(root), name)[0]
    except Exception as e:  # offline and not downloaded yet
        raise ValueError(
            f"data.dataset={name!r}: the Planetoid graph could not be loaded into {str(root)!r} ({type(e).__name__}: "
            f"{e}); torch-geometric downloads it on first use, which needs a network connection; offline, use "
            "data.dataset=stdlib"
        ) from None
    n_classes = int(data.y.max()) + 1
    graph = {"x": data.x, "edge_index": data.edge_index, "y": data.y, "train_mask": data.train_mask,
             "val_mask": data.val_mask}
    return graph, [str(i) for i in range(n_classes)], f"the Planetoid graph {name}"


class _Repeat(IterableDataset):
    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def __iter__(self) -> Iterator[Graph]:
        while True:
            yield self.graph


class NodeClassificationDataModule(L.LightningDataModule):
    """One graph for full-batch node classification. Errors (before training) for a graph with one class, or
    with training-mask nodes that have no label (label < 0).

    Args:
        dataset: ``stdlib`` (offline) or ``Cora``/``CiteSeer``/``PubMed`` (torch-geometric, downloaded once).
        vocab_size: the BPE's vocabulary = the number of node features of the stdlib graph.
        tokenizer_path, tokenizer_max_files, cache_dir: as for text classification; Planetoid graphs under
            ``cache_dir/planetoid``.
        min_files, max_per_class, val_fraction: the stdlib graph (see the module docstring).
    """

    def __init__(
        self,
        dataset: str = "stdlib",
        vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        tokenizer_max_files: int | None = None,
        cache_dir: str | None = None,
        min_files: int = 20,
        max_per_class: int | None = 120,
        val_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        if dataset != "stdlib" and dataset not in PLANETOID:
            raise ValueError(f"data.dataset={dataset!r} is not allowed; allowed: stdlib, {', '.join(PLANETOID)}")
        check_int("data.min_files", min_files, 1)
        check_int("data.tokenizer_max_files", tokenizer_max_files, 1, allow_none=True)
        self.tokenizer_max_files = tokenizer_max_files
        check_int("data.max_per_class", max_per_class, 1, allow_none=True)
        self.val_fraction = check_fraction("data.val_fraction", val_fraction)
        self.dataset, self.requested_vocab_size, self.tokenizer_path = dataset, vocab_size, tokenizer_path
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.min_files, self.max_per_class = min_files, max_per_class
        self.graph: Graph | None = None
        self.classes: list[str] = []
        self.origin = ""
        self.tokenizer_json: str | None = None

    def prepare_data(self) -> None:
        if self.graph is not None:
            return
        if self.dataset == "stdlib":
            if self.tokenizer_path is not None:
                tok = load_tokenizer(self.tokenizer_path)
            else:
                source = StdlibSource(max_files=self.tokenizer_max_files)
                tok, _ = build_tokenizer(source, self.requested_vocab_size, self.cache_dir)
            self.tokenizer_json = tok.to_str()
            graph, classes, origin = stdlib_graph(tok, self.cache_dir, self.min_files, self.max_per_class,
                                                  self.val_fraction)
        else:
            graph, classes, origin = planetoid(self.dataset, self.cache_dir / "planetoid")
        self.set_graph(graph, classes, origin)

    def set_graph(self, graph: Graph, classes: list[str], origin: str) -> None:
        """Use ``graph`` (checked: labels in the training mask, at least 2 classes, a validation node)."""
        check_labels(graph["y"].numpy(), graph["train_mask"].numpy(), origin, len(classes))
        if not bool(graph["val_mask"].any()):
            raise ValueError(f"{origin} has no node in the validation mask; raise data.val_fraction")
        self.graph, self.classes, self.origin = graph, classes, origin
        log.info("%s", self.summary())

    @property
    def majority_baseline(self) -> float:
        """Validation accuracy of predicting the most frequent class of the training nodes."""
        g = self.graph
        majority = torch.bincount(g["y"][g["train_mask"]]).argmax()
        return float((g["y"][g["val_mask"]] == majority).float().mean())

    def summary(self) -> str:
        g = self.graph
        return (f"{self.origin}: {g['x'].shape[0]} nodes, {g['edge_index'].shape[1] // 2} undirected edges, "
                f"{len(self.classes)} classes, {g['x'].shape[1]} features, {int(g['train_mask'].sum())} training / "
                f"{int(g['val_mask'].sum())} validation nodes, majority-class validation accuracy "
                f"{self.majority_baseline:.3f}")

    @property
    def n_classes(self) -> int:
        self.prepare_data()
        return len(self.classes)

    @property
    def n_features(self) -> int:
        self.prepare_data()
        return int(self.graph["x"].shape[1])

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        self.prepare_data()
        return DataLoader(_Repeat(self.graph), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        self.prepare_data()
        return DataLoader([self.graph], batch_size=None)
