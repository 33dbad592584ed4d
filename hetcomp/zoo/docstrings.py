"""A text-retrieval task from real English that ships with Python itself: the standard library's docstrings.

Each docstring of a module, class or function (read with ``ast`` from the stdlib's source files: nothing is
imported or executed) gives one pair: the **query** is its first sentence, the **document** the rest of it. Pairs
whose query has fewer than ``min_query_words`` words or whose document fewer than ``min_document_words`` are
dropped, and so is any pair whose query or document (case and whitespace folded) was seen before, in sorted file
order. The split is by a hash of the query (80/10/10 train/val/test), so a pair's split never depends on which
other pairs exist: the same on every machine with the same Python, and nearly so across Python versions.

The task (``info_nce``, ``retrieval_metric``) is a sentence-embedding model's: a batch of B pairs is 2B sequences,
the B queries then their B documents (``PairCollator``); the embedding of a sequence is the attention-masked mean
of the model's last hidden states, L2-normalized (pooling outside the model, as sentence-transformers does).
``info_nce`` is the in-batch contrastive loss over cosine similarities (each query against every document of the
batch; the loss all-MiniLM-L6-v2 was trained with: scale 20, i.e. temperature 0.05); ``retrieval_metric`` is
Recall@1 of each query's own document among all documents of the evaluated split, with MRR beside it.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hetcomp import distributed
from hetcomp.errors import DataError
from hetcomp.metrics import DatasetMetric

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SENTENCE = re.compile(r"(.+?[.!?])(?=\s+[A-Z(`'\"]|$)", re.S)
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}


@dataclass(frozen=True)
class Pair:
    query: str
    document: str
    source: str  # "module.py:line" of the docstring


def split_docstring(docstring: str) -> tuple[str, str]:
    """(first sentence, the rest), whitespace collapsed. The first sentence is taken from the summary paragraph
    (up to the first blank line, PEP 257): up to the first '.', '!' or '?' followed by a capitalized word or the
    end (so "e.g. a" does not end it); a summary line without one is the whole sentence."""
    paragraphs = [p for p in re.split(r"\n\s*\n", docstring.strip()) if p.strip()]
    if not paragraphs:
        return "", ""
    summary = " ".join(paragraphs[0].split())
    match = _SENTENCE.match(summary)
    query = match.group(1) if match else summary
    rest = " ".join([summary[len(query):], *paragraphs[1:]])
    return query.strip(), " ".join(rest.split())


def _docstrings(path: Path) -> list[tuple[str, int]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text:
                found.append((text, getattr(node, "lineno", 1)))
    return found


def stdlib_root() -> Path:
    """The folder of this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def docstring_pairs(root: str | Path | None = None, packages: Sequence[str] | None = None,
                    min_query_words: int = 5, min_document_words: int = 12,
                    max_document_chars: int = 2000) -> list[Pair]:
    """Every (first sentence, rest) pair of the docstrings under ``root`` (default: the standard library), in
    sorted file order, filtered and deduplicated (see the module docstring). ``packages``: only these top-level
    modules or packages (e.g. ``["json", "email"]``; for fast tests). Test folders and site-packages are skipped.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]))
    if packages is not None:
        wanted = set(packages)
        files = [p for p in files if p.relative_to(root).parts[0].removesuffix(".py") in wanted]
    pairs, seen = [], set()
    for path in files:
        for text, line in _docstrings(path):
            query, document = split_docstring(text)
            if len(query.split()) < min_query_words or len(document.split()) < min_document_words:
                continue
            keys = (" ".join(query.lower().split()), " ".join(document.lower().split()))
            if keys[0] in seen or keys[1] in seen:
                continue
            seen.update(keys)
            pairs.append(Pair(query, document[:max_document_chars], f"{path.relative_to(root)}:{line}"))
    if not pairs:
        raise DataError(f"no docstring pairs under {root} (packages {packages}); is this a Python source tree?")
    return pairs


def split_of(pair: Pair) -> str:
    """The pair's split, from a hash of its query alone."""
    bucket = int(hashlib.sha256(pair.query.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, (low, high) in SPLITS.items() if low <= bucket < high)


def splits(pairs: Sequence[Pair]) -> dict[str, list[Pair]]:
    """{"train", "val", "test"}: the pairs of each split, in their order."""
    out: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        out[split_of(pair)].append(pair)
    return out


class PairDataset(Dataset):
    """(query, document) strings; a DataLoader with ``PairCollator`` makes the model's batches."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, str]:
        pair = self.pairs[index]
        return pair.query, pair.document


class PairCollator:
    """B (query, document) samples -> one batch of 2B tokenized sequences, the queries then the documents, padded
    to the longest in the batch (``input_ids``, ``attention_mask`` and, if the tokenizer gives them,
    ``token_type_ids``): the model's keyword inputs, as a dict."""

    def __init__(self, tokenizer: Callable[..., Any], max_length: int = 128) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts = [q for q, _ in samples] + [d for _, d in samples]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {key: value for key, value in encoded.items()}


def mean_pool(outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized attention-masked mean of the last hidden states ([N, T, H] -> [N, H]). ``outputs``: a model
    output with ``last_hidden_state``, a tuple whose first item is it, or the tensor itself."""
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs[0] if isinstance(outputs, tuple | list) else outputs
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(summed, dim=-1)


def _halves(outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings = mean_pool(outputs, batch["attention_mask"])
    if embeddings.shape[0] % 2:
        raise DataError(f"a retrieval batch holds queries then their documents (2B sequences); this one has "
                        f"{embeddings.shape[0]}")
    return embeddings.chunk(2)


def info_nce(outputs: Any, batch: dict[str, torch.Tensor], scale: float = 20.0) -> torch.Tensor:
    """In-batch contrastive loss: cross-entropy of each query's cosine similarities (times ``scale``) to the
    batch's documents, its own document the target (sentence-transformers' MultipleNegativesRankingLoss). In a
    data-parallel fine-tuning step the documents are the global batch's (``hetcomp.distributed.gather_batch``), so
    every query has one process's negatives."""
    queries, documents = _halves(outputs, batch)
    documents, start = distributed.gather_batch(documents)
    scores = scale * queries @ documents.t()
    return F.cross_entropy(scores, torch.arange(start, start + len(queries), device=scores.device))


def _collect(outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    queries, documents = _halves(outputs, batch)
    return queries.detach().float(), documents.detach().float()


def rank_metrics(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """Recall@1 and MRR of query i's document i among all ``documents`` (cosine similarity; ties count against:
    the rank is 1 + the number of other documents scoring at least as high)."""
    scores = queries @ documents.t()
    own = scores.diagonal().unsqueeze(1)
    others = (scores >= own).sum(1) - 1  # documents at least as close as the query's own, itself excluded
    ranks = (others + 1).double()
    return {"recall@1": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks).mean())}


def _compute(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    queries = torch.cat([q for q, _ in parts])
    documents = torch.cat([d for _, d in parts])
    return rank_metrics(queries, documents)


def retrieval_metric() -> DatasetMetric:
    """Recall@1 over the whole evaluated split (its queries against all its documents), with MRR beside it."""
    return DatasetMetric(_collect, _compute, name="recall@1")
