"""Labelled corpora for building and evaluating mask profiles, streamed in token batches.

A corpus is a JSONL file (one object per line with a text field, a label field and optionally
a score field) or a directory with one subdirectory per label holding .txt files (one text
each) or .jsonl files. Texts are tokenized with the model's tokenizer (BOS first), cut into
windows of at most `max_length` tokens, and grouped by length into right-padded batches of
about `batch_tokens` tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Batch",
    "CorpusError",
    "Record",
    "Window",
    "batches",
    "collate",
    "corpus_fingerprint",
    "read_corpus",
    "records_fingerprint",
    "windows",
]

Scorer = Callable[[str], "float | Sequence[float]"]


class CorpusError(ValueError):
    """A corpus file or record that cannot be read."""


@dataclass(frozen=True, slots=True)
class Record:
    text: str
    label: str | None = None
    score: float | list[float] | None = None  # per text, or per token (without BOS)


def _jsonl(path: Path, *, text_field: str, label_field: str, score_field: str | None,
           label: str | None = None) -> Iterator[Record]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(f"{path}:{number}: need a JSON object with '{text_field}' "
                                  f"({e.__class__.__name__}: {e})") from None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{number}: '{text_field}' must be a string")
            value = row.get(label_field, label) if label is None else label
            score = row.get(score_field) if score_field else None
            if score is not None and not isinstance(score, (int, float, list)):
                raise CorpusError(f"{path}:{number}: '{score_field}' must be a number or list")
            yield Record(text, None if value is None else str(value), score)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_corpus(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    score_field: str | None = None,
) -> Iterator[Record]:
    """Stream the records of a JSONL file or of a directory with one folder per label."""
    path = Path(path)
    fields = dict(text_field=text_field, label_field=label_field, score_field=score_field)
    if path.is_file():
        yield from _jsonl(path, **fields)
        return
    if not path.is_dir():
        raise CorpusError(f"corpus {path} does not exist")
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CorpusError(f"corpus directory {path} has no label folders")
    for folder in folders:
        for file in _files(folder):
            if file.suffix == ".jsonl":
                yield from _jsonl(file, **fields, label=folder.name)
            elif file.suffix in (".txt", ".md", ""):
                yield Record(file.read_text(encoding="utf-8"), folder.name)


def corpus_fingerprint(path: str | Path) -> str:
    """sha256 of the corpus files' relative paths and contents."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else _files(path)
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        digest.update(b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()[:32]}"


def records_fingerprint(records: Iterable[Record]) -> str:
    """sha256 of records given inline (their texts, labels and scores)."""
    digest = hashlib.sha256(repr([(r.text, r.label, r.score) for r in records]).encode())
    return f"sha256:{digest.hexdigest()[:32]}"


@dataclass(slots=True)
class Batch:
    """Right-padded token batch: input_ids, attention_mask long [B, T]; scores float [B, T]
    (0 where none); labels [B] (None for unlabelled rows)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: list[str | None]
    scores: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def routed_tokens(self) -> torch.Tensor:
        """bool [B, T]: real tokens past the BOS position. The BOS token routes the same for
        every text, so it carries no label information."""
        keep = self.attention_mask.bool().clone()
        keep[:, 0] = False
        return keep


@dataclass(slots=True)
class Window:
    """A tokenized text, or a piece of one at most max_length long (BOS first)."""

    ids: list[int]
    label: str | None
    scores: list[float] | None


def windows(records: Iterable[Record], tokenizer, *, max_length: int,
            scorer: Scorer | None = None) -> Iterator[Window]:
    """Each record's tokens (empty texts skipped) in windows of at most max_length."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    for record in records:
        ids = tokenizer.encode(record.text, add_bos=False)
        if not ids:
            continue
        score = scorer(record.text) if scorer is not None else record.score
        if score is None:
            scores = None
        elif isinstance(score, (int, float)):
            scores = [float(score)] * len(ids)  # a text's score spread over its tokens
        else:
            scores = [float(s) for s in score]
            if len(scores) != len(ids):
                raise CorpusError(f"per-token scores: {len(scores)} scores for {len(ids)} "
                                  f"tokens in text {record.text[:40]!r}")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        step = max_length - len(bos)
        for start in range(0, len(ids), step):
            window = bos + ids[start : start + step]
            window_scores = None if scores is None else (
                [0.0] * len(bos) + scores[start : start + step])
            yield Window(window, record.label, window_scores)


def batches(
    records: Iterable[Record],
    tokenizer,
    *,
    batch_tokens: int = 8192,
    max_length: int = 512,
    scorer: Scorer | None = None,
    buffer: int = 256,
) -> Iterator[Batch]:
    """Token batches of at most `batch_tokens` (padded) tokens, windows sorted by length within
    a buffer of `buffer` windows so that little is padding."""
    pending: list[Window] = []

    def flush(buffered: list[Window]) -> Iterator[Batch]:
        buffered.sort(key=lambda w: len(w.ids))
        group: list[Window] = []
        for window in buffered:
            if group and len(window.ids) * (len(group) + 1) > batch_tokens:
                yield collate(group)
                group = []
            group.append(window)
        if group:
            yield collate(group)

    for window in windows(records, tokenizer, max_length=max_length, scorer=scorer):
        pending.append(window)
        if len(pending) >= buffer:
            yield from flush(pending)
            pending = []
    if pending:
        yield from flush(pending)


def collate(windows: list[Window]) -> Batch:
    """Right-padded batch of the windows, in their order."""
    B, T = len(windows), max(len(w.ids) for w in windows)
    ids = torch.zeros(B, T, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    has_scores = any(w.scores is not None for w in windows)
    scores = torch.zeros(B, T, dtype=torch.float64) if has_scores else None
    for row, window in enumerate(windows):
        n = len(window.ids)
        ids[row, :n] = torch.tensor(window.ids)
        attention[row, :n] = 1
        if scores is not None:
            if window.scores is None:
                raise CorpusError("some texts have toxicity scores and some do not")
            scores[row, :n] = torch.tensor(window.scores, dtype=torch.float64)
    return Batch(ids, attention, [w.label for w in windows], scores)
