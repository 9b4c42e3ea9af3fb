"""Text the pipeline uses: the shipped sentences, user text files, STS-B and labelled TSVs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compress.core.errors import CompressError

SENTENCES_PATH = Path(__file__).parent.parent / "data" / "sentences.txt"


def shipped_sentences() -> list[str]:
    """~200 varied English sentences written for this project (calibration and fidelity text)."""
    return [s for s in SENTENCES_PATH.read_text(encoding="utf-8").splitlines() if s.strip()]


def calibration_and_heldout(texts: list[str]) -> tuple[list[str], list[str]]:
    """Split text so the calibration set and the held-out fidelity set never overlap (even/odd lines)."""
    return texts[0::2], texts[1::2]


def read_utf8(path: Path) -> str:
    """A text file's content; a file that is not UTF-8 is one line naming the byte and the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CompressError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save it as UTF-8"
        ) from None


def _jsonl_text(path: Path, n: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CompressError(f'{path}:{n}: not a JSON object ({e.msg}): write one {{"text": ...}} per line') from None
    if not isinstance(row, dict) or not isinstance(row.get("text", ""), str):
        raise CompressError(f'{path}:{n}: expected an object with a "text" string, e.g. {{"text": "a sentence"}}')
    return row.get("text", "")


def read_texts(path: str | Path) -> list[str]:
    """Unlabelled text from a .txt (one per line), .jsonl ({"text": ...}) or .csv/.tsv (first text column)."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"data file {p} not found: pass an existing .txt, .jsonl or .csv file to --data")
    suffix, content = p.suffix.lower(), read_utf8(p)
    if suffix == ".jsonl":
        texts = [_jsonl_text(p, n, line) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    elif suffix in (".csv", ".tsv"):
        texts = [row[0] for row in csv.reader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",") if row]
    else:
        texts = content.splitlines()
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise CompressError(f"data file {p} holds no text: give one sentence per line (or JSONL with a 'text' field)")
    return texts


@dataclass(frozen=True)
class PairSet:
    """Sentence pairs with gold similarity scores (STS-B format)."""

    first: list[str]
    second: list[str]
    scores: list[float]


def _tsv_rows(path: str | Path, what: str, flag: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, columns) of a tab-separated file, blank lines skipped. QUOTE_NONE: STS-B sentences contain bare
    quotes that the csv module would otherwise merge across rows."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"{what} {p} not found: pass {flag} with an existing file")
    rows = csv.reader(io.StringIO(read_utf8(p), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for n, row in enumerate(rows, 1):
        if row:
            yield n, row


def _parse(path: str | Path, n: int, text: str, kind: type, fix: str) -> float | int:
    """``kind(text)``, or a one-line error naming the file, the line and ``fix``."""
    try:
        return kind(text)
    except ValueError:
        raise CompressError(f"{path}:{n}: {fix}") from None


def read_stsb(path: str | Path) -> PairSet:
    """STS-B TSV: genre, file, year, id, score, sentence1, sentence2[, more columns]. Malformed rows are refused."""
    first, second, scores = [], [], []
    for n, row in _tsv_rows(path, "STS-B file", "stsb:PATH"):
        if len(row) < 7:
            raise CompressError(f"{path}:{n}: expected 7+ tab-separated columns (genre, file, year, id, score, s1, s2)")
        scores.append(
            _parse(path, n, row[4], float, f"score column '{row[4]}' is not a number; is this an STS-B file?")
        )
        first.append(row[5])
        second.append(row[6])
    if len(scores) < 3:
        raise CompressError(f"{path} holds fewer than 3 pairs: Spearman needs more data")
    return PairSet(first, second, scores)


@dataclass(frozen=True)
class LabelledSet:
    texts: list[str]
    labels: list[int]


def read_labelled(path: str | Path) -> LabelledSet:
    """Classification TSV: text<TAB>label (label an integer id). A header line 'text<TAB>label' is skipped."""
    texts, labels = [], []
    for n, row in _tsv_rows(path, "labelled file", "accuracy:PATH (a text<TAB>label TSV)"):
        if n == 1 and row[-1].strip().lower() == "label":
            continue
        if len(row) < 2:
            raise CompressError(f"{path}:{n}: expected 'text<TAB>label'")
        labels.append(_parse(path, n, row[-1], int, f"label '{row[-1]}' is not an integer class id"))
        texts.append("\t".join(row[:-1]))
    if not texts:
        raise CompressError(f"{path} holds no labelled rows")
    return LabelledSet(texts, labels)
