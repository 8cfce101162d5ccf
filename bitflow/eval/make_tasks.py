"""Generate bitflow's offline lm-eval tasks from the held-out files of the stdlib corpus.

    python -m bitflow.eval.make_tasks            # rewrite bitflow/eval/tasks/data/*.json
    python -m bitflow.eval.make_tasks --check    # exit 1 if the shipped files differ from a fresh generation

The files are a pure function of the running Python's standard library (the validation split of
:class:`~bitflow.data.sources.StdlibSource`, a hash of each file's relative path), ``seed`` and ``num_docs``:
files are read in sorted order, examples are chosen by a sha1 hash instead of a random generator, and the JSON
is written with sorted keys, so two runs give the same bytes. The Python version is recorded in every file.

Three tasks, all zero-shot:

- ``bitflow_docstring_names`` (multiple choice, 4 options, chance 25%): which of four function names fits a
  docstring. Each option is a context ``def <name>(<args>):\\n    \"\"\"`` and the score is the log-likelihood
  of the docstring's first paragraph after it (the names of other held-out functions serve as distractors).
  The docstring never contains the name itself.
- ``bitflow_next_identifier`` (LAMBADA-like, Paperno et al. 2016, arXiv 1606.06031): predict the last
  identifier of a logical line from up to 600 characters of code before it; the identifier occurs earlier in
  that context. Metrics: accuracy of greedy decoding of the whole identifier (chance ~0), perplexity.
- ``bitflow_next_line`` (HellaSwag-like, Zellers et al. 2019, arXiv 1905.07830; 4 options, chance 25%): which
  line comes next after up to 600 characters of a file; distractors are lines from other held-out files,
  re-indented like the true line.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import hashlib
import io
import json
import keyword
import math
import platform
import re
import sys
import tokenize
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bitflow.eval.local_tasks import LOCAL_TASKS, tasks_dir

GENERATOR_VERSION = 2
DEFAULT_SEED = 1234
DEFAULT_NUM_DOCS = 400
VAL_FRACTION = 0.05  # the default stdlib corpus split (conf/data/stdlib.yaml)
CONTEXT_CHARS = 600  # at most this much code before the target (fits a 256-token context)
MIN_CONTEXT_CHARS = 150
MAX_PER_FILE = 40  # spread the examples over many files


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from sha1 of the parts: the same on every machine and Python version."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def held_out_files(val_fraction: float = VAL_FRACTION) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib corpus's validation files, sorted by path."""
    from bitflow.data.sources import StdlibSource

    source = StdlibSource(val_fraction=val_fraction)
    return [
        (rel, path.read_text(encoding="utf-8", errors="replace")) for rel, path in source.split_files("val")
    ]


def _select(candidates: list[dict], seed: int, num_docs: int) -> list[dict]:
    """Up to ``num_docs`` candidates, at most MAX_PER_FILE per file, chosen and ordered by a hash of their
    id."""
    ranked = sorted(candidates, key=lambda c: (stable_int(seed, c["id"]), c["id"]))
    per_file: dict[str, int] = {}
    chosen = []
    for c in ranked:
        file = c["id"].rsplit(":", 2)[0]
        if per_file.get(file, 0) < MAX_PER_FILE:
            per_file[file] = per_file.get(file, 0) + 1
            chosen.append(c)
        if len(chosen) == num_docs:
            break
    return chosen


def _pick_distinct(pool: list[str], n: int, key: str, seed: int, exclude: Callable[[str], bool]) -> list[str]:
    """``n`` distinct items of ``pool`` chosen by successive hashes of (seed, key, k), skipping excluded
    ones."""
    out: list[str] = []
    k = 0
    while len(out) < n:
        item = pool[stable_int(seed, key, k) % len(pool)]
        k += 1
        if item not in out and not exclude(item):
            out.append(item)
        if k > 100 * (n + 1) + len(pool):
            raise ValueError(f"cannot find {n} distractors for {key!r}: the pool of {len(pool)} is too small")
    return out


def _with_gold(gold: str, distractors: list[str], key: str, seed: int) -> tuple[list[str], int]:
    label = stable_int(seed, key, "label") % (len(distractors) + 1)
    return distractors[:label] + [gold] + distractors[label:], label


# ------------------------------------------------------------------------------------------ docstrings
def _parse(text: str) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old test files
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError):
            return None  # test files with deliberate syntax errors


def docstring_candidates(files: Iterable[tuple[str, str]]) -> list[dict]:
    """Functions with a docstring whose first paragraph has 15..300 characters and does not name the
    function."""
    out, seen = [], set()
    for rel, text in files:
        tree = _parse(text)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = node.name
            if len(name) < 3 or (name.startswith("__") and name.endswith("__")):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            summary = doc.strip().split("\n\n")[0].strip()
            args = ast.unparse(node.args)
            if not 15 <= len(summary) <= 300 or len(args) > 80 or name in summary or '"""' in summary:
                continue
            if (name, summary) in seen:
                continue
            seen.add((name, summary))
            body = "\n    ".join(line.rstrip() for line in summary.split("\n"))
            out.append(
                {"id": f"{rel}:{node.lineno}:{node.col_offset}", "name": name, "args": args, "doc": body}
            )
    return out


def make_docstring_names(files: list[tuple[str, str]], seed: int, num_docs: int) -> list[dict]:
    """Docs of ``bitflow_docstring_names``: ``contexts`` (4 ``def`` lines), ``label``, ``target``
    (docstring)."""
    candidates = docstring_candidates(files)
    pool = sorted({c["name"] for c in candidates})
    docs = []
    for c in _select(candidates, seed, num_docs):
        distractors = _pick_distinct(pool, 3, c["id"], seed, exclude=lambda n, c=c: n == c["name"])
        names, label = _with_gold(c["name"], distractors, c["id"], seed)
        docs.append(
            {
                "id": c["id"],
                "names": names,
                "contexts": [f'def {n}({c["args"]}):\n    """' for n in names],
                "label": label,
                "target": c["doc"] + '"""',
            }
        )
    return docs


# ----------------------------------------------------------------------------------------- identifiers
def _line_offsets(text: str) -> list[int]:
    offsets, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offsets.append(pos)
    return offsets


def _context_start(text: str, offsets: list[int], end: int) -> int:
    """The first line start at or after ``end - CONTEXT_CHARS``."""
    lo = end - CONTEXT_CHARS
    return next(o for o in offsets if o >= lo)


def identifier_candidates(files: Iterable[tuple[str, str]]) -> list[dict]:
    """The last identifier (>= 3 characters, not a keyword) of each logical line that also occurs earlier in
    the preceding <= 600 characters, with at least 150 characters of context."""
    out = []
    for rel, text in files:
        offsets = _line_offsets(text)
        last_name = None
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
                    last_name = tok
                elif tok.type == tokenize.NEWLINE:
                    if last_name is not None and len(last_name.string) >= 3:
                        start = offsets[last_name.start[0] - 1] + last_name.start[1]
                        cut = _context_start(text, offsets, start)
                        raw = text[cut:start]
                        context = raw.rstrip()
                        if len(context) >= MIN_CONTEXT_CHARS and re.search(
                            rf"\b{re.escape(last_name.string)}\b", context
                        ):
                            out.append(
                                {
                                    "id": f"{rel}:{last_name.start[0]}:{last_name.start[1]}",
                                    "context": context,
                                    "target": raw[len(context) :] + last_name.string,
                                }
                            )
                    last_name = None
        except (tokenize.TokenError, IndentationError, SyntaxError):
            continue  # keep what was found before the error
    return out


def make_next_identifier(files: list[tuple[str, str]], seed: int, num_docs: int) -> list[dict]:
    """Docs of ``bitflow_next_identifier``: ``context`` and ``target`` (leading whitespace + identifier)."""
    return [
        {"id": c["id"], "context": c["context"], "target": c["target"]}
        for c in _select(identifier_candidates(files), seed, num_docs)
    ]


# ------------------------------------------------------------------------------------------- next line
def _usable_line(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 12 and not stripped.startswith("#") and len(line) <= 120


def line_candidates(files: Iterable[tuple[str, str]]) -> list[dict]:
    """Lines of at most 120 characters with >= 12 non-blank ones, not comments, after >= 150 characters of the
    same file."""
    out = []
    for rel, text in files:
        lines = text.splitlines(keepends=True)
        offsets = _line_offsets(text)
        for i, line in enumerate(lines):
            body = line.rstrip("\r\n")
            if not _usable_line(body):
                continue
            cut = _context_start(text, offsets, offsets[i])
            context = text[cut : offsets[i]]
            if len(context) >= MIN_CONTEXT_CHARS and context.endswith("\n"):
                out.append({"id": f"{rel}:{i + 1}:0", "context": context, "line": body})
    return out


def _similar_length(
    pool: list[tuple[int, str, str]], length: int, minimum: int = 50
) -> list[tuple[int, str, str]]:
    """The entries of ``pool`` (sorted by length) within 0.8x..1.25x ``length``, widened to the ``minimum``
    nearest in length when that range is small."""
    lengths = [n for n, _, _ in pool]
    lo, hi = (
        bisect.bisect_left(lengths, math.ceil(0.8 * length)),
        bisect.bisect_right(lengths, int(1.25 * length)),
    )
    while hi - lo < minimum and (lo > 0 or hi < len(pool)):
        lo, hi = max(0, lo - 1), min(len(pool), hi + 1)
    return pool[lo:hi]


def make_next_line(files: list[tuple[str, str]], seed: int, num_docs: int) -> list[dict]:
    """Docs of ``bitflow_next_line``: ``context`` (ends with a newline), ``choices`` (4 lines), ``label``.

    Distractors have about the gold line's length (0.8x..1.25x), so that neither the summed log-likelihood
    (``acc``, which favours short options) nor the per-character one (``acc_norm``) can win on length alone.
    """
    candidates = line_candidates(files)
    pool = sorted(
        {(len(c["line"].strip()), c["line"].strip(), c["id"].rsplit(":", 2)[0]) for c in candidates}
    )
    docs = []
    for c in _select(candidates, seed, num_docs):
        file = c["id"].rsplit(":", 2)[0]
        indent = c["line"][: len(c["line"]) - len(c["line"].lstrip())]
        gold = c["line"].strip()
        near = [f"{f}\x1f{text}" for _, text, f in _similar_length(pool, len(gold))]
        picked = _pick_distinct(
            near,
            3,
            c["id"],
            seed,
            exclude=lambda item, file=file, gold=gold: (
                item.split("\x1f")[0] == file or item.split("\x1f")[1] == gold
            ),
        )
        texts = [indent + p.split("\x1f")[1] for p in picked]
        if len(set(texts)) < 3:
            continue
        choices, label = _with_gold(c["line"], texts, c["id"], seed)
        docs.append({"id": c["id"], "context": c["context"], "choices": choices, "label": label})
    return docs


# ---------------------------------------------------------------------------------------------------- writing
BUILDERS: dict[str, Callable[[list[tuple[str, str]], int, int], list[dict]]] = {
    "docstring_names": make_docstring_names,
    "next_identifier": make_next_identifier,
    "next_line": make_next_line,
}


def render(name: str, docs: list[dict], seed: int, num_val_files: int) -> str:
    """The data file's text: one JSON object, sorted keys, one document per line (diffable, byte-stable)."""
    task = next(t for t, stem in LOCAL_TASKS.items() if stem == name)
    meta = {
        "task": task,
        "generator": "python -m bitflow.eval.make_tasks",
        "generator_version": GENERATOR_VERSION,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "corpus": f"stdlib validation split (val_fraction={VAL_FRACTION}, sha1 of the relative path)",
        "num_val_files": num_val_files,
        "seed": seed,
        "num_docs": len(docs),
    }
    lines = [json.dumps(d, sort_keys=True, ensure_ascii=False) for d in docs]
    return '{"meta": ' + json.dumps(meta, sort_keys=True) + ',\n"docs": [\n' + ",\n".join(lines) + "\n]}\n"


def generate(
    out_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    num_docs: int = DEFAULT_NUM_DOCS,
    files: list[tuple[str, str]] | None = None,
) -> dict[str, Path]:
    """Write every local task's data file into ``out_dir`` (default: the shipped ``bitflow/eval/tasks/data``)
    and return their paths. ``files`` replaces the stdlib's held-out files (for tests)."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be a positive integer, got {num_docs}")
    files = held_out_files() if files is None else sorted(files)
    out = Path(out_dir) if out_dir is not None else tasks_dir() / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in BUILDERS.items():
        docs = build(files, seed, num_docs)
        if not docs:
            raise ValueError(f"no examples for local task {name!r}: the held-out files give no candidates")
        paths[name] = out / f"{name}.json"
        paths[name].write_bytes(render(name, docs, seed, len(files)).encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bitflow.eval.make_tasks [--out DIR] [--seed N] [--num-docs N] [--check]``."""
    parser = argparse.ArgumentParser(
        prog="python -m bitflow.eval.make_tasks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default=None, help="output directory (default: the shipped task data)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--num-docs", type=int, default=DEFAULT_NUM_DOCS, help="examples per task (at most)")
    parser.add_argument(
        "--check", action="store_true", help="compare with the shipped files instead of writing"
    )
    args = parser.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(tmp, args.seed, args.num_docs)
            shipped = tasks_dir() / "data"
            stale = [
                n
                for n, p in fresh.items()
                if not (shipped / p.name).is_file() or (shipped / p.name).read_bytes() != p.read_bytes()
            ]
        if stale:
            print(f"local task data differ from a fresh generation: {stale}", file=sys.stderr)
            return 1
        print("local task data are up to date")
        return 0
    for name, path in generate(args.out, args.seed, args.num_docs).items():
        n = json.loads(path.read_text(encoding="utf-8"))["meta"]["num_docs"]
        print(f"{name}: {n} docs -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
