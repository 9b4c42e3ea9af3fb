"""Text the pipeline uses: the shipped sentences, user text files, STS-B and labelled TSVs."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError

SENTENCES_PATH = Path(__file__).parent / "data" / "sentences.txt"


def shipped_sentences() -> list[str]:
    """~200 varied English sentences written for this project (calibration and fidelity text)."""
    return [s for s in SENTENCES_PATH.read_text(encoding="utf-8").splitlines() if s.strip()]


def calibration_and_heldout(texts: list[str]) -> tuple[list[str], list[str]]:
    """Split text so the calibration set and the held-out fidelity set never overlap (even/odd lines)."""
    return texts[0::2], texts[1::2]


def read_texts(path: str | Path) -> list[str]:
    """Unlabelled text from a .txt (one per line), .jsonl ({"text": ...}) or .csv/.tsv (first text column)."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"data file {p} not found: pass an existing .txt, .jsonl or .csv file to --data")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        texts = [json.loads(line).get("text", "") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in (".csv", ".tsv"):
        delim = "\t" if suffix == ".tsv" else ","
        with p.open(encoding="utf-8", newline="") as f:
            texts = [row[0] for row in csv.reader(f, delimiter=delim) if row]
    else:
        texts = p.read_text(encoding="utf-8").splitlines()
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


def read_stsb(path: str | Path) -> PairSet:
    """STS-B TSV: genre, file, year, id, score, sentence1, sentence2[, more columns]. Malformed rows are refused."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"STS-B file {p} not found: pass stsb:PATH with an existing STS-B .csv/.tsv file")
    first, second, scores = [], [], []
    # QUOTE_NONE: STS-B sentences contain bare quotes that the csv module would otherwise merge across rows.
    with p.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row:
                continue
            if len(row) < 7:
                raise CompressError(f"{p}:{n}: expected 7+ tab-separated columns (genre, file, year, id, score, s1, s2)")
            try:
                scores.append(float(row[4]))
            except ValueError:
                raise CompressError(f"{p}:{n}: score column '{row[4]}' is not a number; is this an STS-B file?") from None
            first.append(row[5])
            second.append(row[6])
    if len(scores) < 3:
        raise CompressError(f"{p} holds fewer than 3 pairs: Spearman needs more data")
    return PairSet(first, second, scores)


@dataclass(frozen=True)
class LabelledSet:
    texts: list[str]
    labels: list[int]


def read_labelled(path: str | Path) -> LabelledSet:
    """Classification TSV: text<TAB>label (label an integer id). A header line 'text<TAB>label' is skipped."""
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"labelled file {p} not found: pass accuracy:PATH with a text<TAB>label TSV")
    texts, labels = [], []
    with p.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or (n == 1 and row[-1].strip().lower() == "label"):
                continue
            if len(row) < 2:
                raise CompressError(f"{p}:{n}: expected 'text<TAB>label'")
            try:
                labels.append(int(row[-1]))
            except ValueError:
                raise CompressError(f"{p}:{n}: label '{row[-1]}' is not an integer class id") from None
            texts.append("\t".join(row[:-1]))
    if not texts:
        raise CompressError(f"{p} holds no labelled rows")
    return LabelledSet(texts, labels)
