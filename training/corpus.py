"""A labelled corpus of code and prose from files a standard Linux machine with Python has.

Labels and sources (whatever of them is installed):
    python      the standard library (*.py)
    c           system headers (/usr/include, *.h)
    javascript  npm's own sources (*.js)
    perl        Perl modules (*.pm), their POD removed
    english     Perl's POD documentation (*.pod and the POD in *.pm), directives and verbatim
                blocks removed
Texts are chunks of about `chunk_chars` characters cut at line ends. Files are taken in a
fixed order (hash of path and content) up to a byte budget per label, so the corpus is
deterministic for a given machine; each chunk goes to train / valid / test by a hash of its
source and position. Written as JSONL ({"text", "label", "source"}) with a manifest holding
the fingerprint (hash of every chunk) and counts. Nothing is downloaded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LANGUAGES", "CorpusManifest", "build_corpus", "language_sources"]

LANGUAGES = ("python", "c", "javascript", "perl", "english")
SPLITS = {"train": 0.9, "valid": 0.05, "test": 0.05}


def _strip_pod(text: str) -> str:
    """Perl code without its embedded POD (from a line starting with =word to =cut)."""
    return re.sub(_POD, "", text)


_POD = r"(?ms)^=[a-zA-Z].*?(?:^=cut\b.*?$|\Z)"


def _pod_prose(text: str) -> str:
    """The prose of the POD in a file: no directives, no indented verbatim blocks, no markup."""
    pod = "\n".join(m.group(0) for m in re.finditer(_POD, text))
    lines = [l for l in pod.splitlines() if not l.startswith(("=", " ", "\t"))]
    prose = "\n".join(lines)
    prose = re.sub(r"[A-Z]<<+\s*(.*?)\s*>+>", r"\1", prose)
    prose = re.sub(r"[A-Z]<([^<>]*)>", r"\1", prose)
    return re.sub(r"\n{3,}", "\n\n", prose)


def language_sources() -> dict[str, tuple[list[str], Callable[[str], str]]]:
    """label -> (glob patterns, text cleaner)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    perl_roots = ["/usr/share/perl/5*", "/usr/share/perl5", "/usr/lib/x86_64-linux-gnu/perl*/5*",
                  "/usr/lib/aarch64-linux-gnu/perl*/5*"]
    keep = lambda text: text  # noqa: E731
    return {
        "python": ([f"{stdlib}/*.py", f"{stdlib}/*/*.py"], keep),
        "c": (["/usr/include/*.h", "/usr/include/*/*.h", "/usr/include/*/*/*.h"], keep),
        "javascript": (["/usr/lib/node_modules/npm/**/*.js",
                        "/usr/local/lib/node_modules/npm/**/*.js", "/usr/share/nodejs/**/*.js"],
                       keep),
        "perl": ([f"{r}/**/*.pm" for r in perl_roots], _strip_pod),
        "english": ([f"{r}/**/*.pod" for r in perl_roots] + [f"{r}/**/*.pm" for r in perl_roots],
                    _pod_prose),
    }


def _files(patterns: list[str]) -> list[Path]:
    found = {Path(p).resolve() for pattern in patterns for p in glob.glob(pattern, recursive=True)}
    return sorted(p for p in found if p.is_file() and "site-packages" not in p.parts)


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    lines, size = [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line)
        if size >= chunk_chars:
            yield "".join(lines)
            lines, size = [], 0
    if size >= chunk_chars // 4:
        yield "".join(lines)


def _split(key: str) -> str:
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return "train" if u < SPLITS["train"] else "valid" if u < 1 - SPLITS["test"] else "test"


@dataclass
class CorpusManifest:
    fingerprint: str
    counts: dict[str, dict[str, int]]  # label -> split -> texts
    chars: dict[str, int]  # label -> characters
    files: dict[str, int]  # label -> files used
    missing: list[str]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def build_corpus(out_dir: str | Path, *, max_chars_per_label: int = 4_000_000,
                 chunk_chars: int = 1500, labels: tuple[str, ...] = LANGUAGES) -> CorpusManifest:
    """Write train.jsonl, valid.jsonl, test.jsonl and manifest.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    counts = {l: {s: 0 for s in SPLITS} for l in labels}
    chars, nfiles, missing = {l: 0 for l in labels}, {l: 0 for l in labels}, []
    handles = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        sources = language_sources()
        for label in labels:
            patterns, clean = sources[label]
            contents = []
            for path in _files(patterns):
                try:
                    text = clean(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    key = hashlib.sha256(f"{path.name}\0{text}".encode()).hexdigest()
                    contents.append((key, path, text))
            if not contents:
                missing.append(label)
                continue
            for key, path, text in sorted(contents):  # a fixed, content-defined order
                if chars[label] >= max_chars_per_label:
                    break
                nfiles[label] += 1
                for n, chunk in enumerate(_chunks(text, chunk_chars)):
                    if chars[label] >= max_chars_per_label:
                        break
                    split = _split(f"{key}:{n}")
                    row = {"text": chunk, "label": label, "source": f"{path.name}#{n}"}
                    handles[split].write(json.dumps(row, ensure_ascii=False) + "\n")
                    digest.update(f"{label}\0{split}\0{chunk}".encode())
                    counts[label][split] += 1
                    chars[label] += len(chunk)
    finally:
        for h in handles.values():
            h.close()
    manifest = CorpusManifest(f"sha256:{digest.hexdigest()[:32]}", counts, chars, nfiles, missing)
    (out / "manifest.json").write_text(manifest.to_json() + "\n")
    return manifest
