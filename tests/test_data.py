import pytest

from compress.core.data import calibration_and_heldout, read_labelled, read_stsb, read_texts, shipped_sentences
from compress.core.errors import CompressError


def test_shipped_sentences_split_without_overlap():
    texts = shipped_sentences()
    assert 190 <= len(texts) <= 210
    cal, held = calibration_and_heldout(texts)
    assert not set(cal) & set(held) and len(cal) + len(held) == len(texts)


def test_stsb_reader_keeps_bare_quotes_and_extra_columns(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text(
        'g\tf\t2012\t1\t4.5\tHe said "hi.\tShe said hi.\textra\n'
        'g\tf\t2012\t2\t1.0\tA cat.\tA "dog".\n'
        "g\tf\t2012\t3\t0.0\tRain.\tSun.\n"
    )
    pairs = read_stsb(p)
    assert pairs.scores == [4.5, 1.0, 0.0]
    assert pairs.first[0] == 'He said "hi.' and pairs.second[1] == 'A "dog".'


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("a\tb\tc\n", "7\\+ tab-separated"),
        ("g\tf\t2012\t1\tfive\ta\tb\n" * 3, "not a number"),
    ],
)
def test_stsb_reader_refuses_malformed_files(tmp_path, content, pattern):
    p = tmp_path / "s.csv"
    p.write_text(content)
    with pytest.raises(CompressError, match=pattern):
        read_stsb(p)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "c.csv").write_text("hello,1\nworld,2\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y"]
    assert read_texts(tmp_path / "c.csv") == ["hello", "world"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(CompressError, match="holds no text"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(CompressError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_labelled_reader(tmp_path):
    p = tmp_path / "l.tsv"
    p.write_text("text\tlabel\ngood film\t1\nbad film\t0\n")
    d = read_labelled(p)
    assert d.texts == ["good film", "bad film"] and d.labels == [1, 0]
    p.write_text("good film\tpositive\n")
    with pytest.raises(CompressError, match="not an integer"):
        read_labelled(p)
