"""Corpus sources: every source kind, the split rule, the seeded order and the errors."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest

from unineurons.corpus import Document, ShuffledDocuments, open_source, order_key, split_of
from unineurons.errors import UnineuronsError

TEXTS = [f"document number {i}: " + "word " * (i % 7 + 1) + "\nend" for i in range(60)]


def write_jsonl(path, texts, extra_lines=()):
    lines = [json.dumps({"text": t, "meta": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


def test_text_file(tmp_path):
    f = tmp_path / "notes.weird-ext"
    f.write_text("héllo\nworld", encoding="utf-8")
    assert list(open_source(str(f))) == [Document("notes.weird-ext", "héllo\nworld")]


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / "b" / "c.py").write_text("print(1)")
    (tmp_path / "b" / "empty.txt").write_text("")  # empty documents are skipped
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a text extension
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")  # not UTF-8
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")
    docs = list(open_source(str(tmp_path)))
    assert [d.id for d in docs] == ["a.txt", "b/c.py", "b/z.md"]
    assert [d.text for d in docs] == ["aaa", "print(1)", "zed"]


def test_jsonl_plain_gz_zst_and_folder(tmp_path):
    import zstandard

    plain = write_jsonl(tmp_path / "d.jsonl", TEXTS[:3], extra_lines=[""])
    expected = [Document(f"d.jsonl:{i + 1}", t) for i, t in enumerate(TEXTS[:3])]
    assert list(open_source(f"jsonl:{plain}")) == expected

    data = plain.read_bytes()
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    zst = list(open_source(f"jsonl:{tmp_path / 'z' / 'd.jsonl.zst'}"))
    assert [d.text for d in zst] == TEXTS[:3]
    (tmp_path / "z" / "e.jsonl.gz").write_bytes(gzip.compress(data))
    folder = list(open_source(f"jsonl:{tmp_path / 'z'}"))
    assert [d.id for d in folder][::3] == ["d.jsonl.zst:1", "e.jsonl.gz:1"]
    assert [d.text for d in folder] == TEXTS[:3] * 2


def test_jsonl_bad_line_names_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], extra_lines=['{"body": "x"}'])
    with pytest.raises(UnineuronsError, match="line 3"):
        list(open_source(f"jsonl:{bad}"))
    corrupt = tmp_path / "c.jsonl.zst"
    corrupt.write_bytes(b"not zstd at all")
    with pytest.raises(UnineuronsError, match="cannot be read"):
        list(open_source(f"jsonl:{corrupt}"))


def test_hf_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS[:4] + [""], "n": list(range(5))})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = list(open_source(f"hf:{tmp_path / 'ds'}"))
    assert [d.text for d in docs] == TEXTS[:4]
    assert docs[0].id.endswith("ds[train]#0")
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([1, 2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in open_source(f"hf:{tmp_path / 'dd'}:validation")] == TEXTS[1:3]
    with pytest.raises(UnineuronsError, match="no split 'test'"):
        open_source(f"hf:{tmp_path / 'dd'}:test")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(UnineuronsError, match="no 'text' column"):
        open_source(f"hf:{tmp_path / 'nt'}")


def test_hf_options_column_config_streaming(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_dict({"body": TEXTS[:3]}).save_to_disk(str(tmp_path / "nt"))
    assert [d.text for d in open_source(f"hf:{tmp_path / 'nt'}?column=body")] == TEXTS[:3]
    with pytest.raises(UnineuronsError, match="option 'colum=body' is not one of"):
        open_source(f"hf:{tmp_path / 'nt'}?colum=body")
    with pytest.raises(UnineuronsError, match="streaming must be 1 or 0"):
        open_source(f"hf:{tmp_path / 'nt'}?streaming=yes")
    calls = []

    def fake_load(name, config=None, *, split, streaming):  # the hub, as a stream of rows
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(
            lambda: ({"content": t, "meta": i} for i, t in enumerate(TEXTS[:4])))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = list(open_source("hf:org/corpus:validation?config=v1&column=content&streaming=1"))
    assert [d.text for d in docs] == TEXTS[:4]
    assert docs[1].id == "org/corpus[validation]#1"
    assert calls == [("org/corpus", "v1", "validation", True)]
    list(open_source("hf:org/corpus?column=content"))
    assert calls[-1] == ("org/corpus", None, "train", False)


def test_hf_missing_dataset_offline(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    with pytest.raises(UnineuronsError, match="does not exist"):
        open_source(f"hf:{tmp_path / 'nothing'}")
    # Offline, a hub id that is not cached fails at once with a clear message.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnineuronsError, match="offline and not cached"):
        open_source("hf:unineurons-test/no-such-dataset")


def test_stdlib_source():
    docs = list(itertools.islice(open_source("stdlib"), 20))
    assert len(docs) == 20
    assert all(d.id.startswith("stdlib/") and d.id.endswith(".py") for d in docs)
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert not any("site-packages" in d.id for d in docs)


@pytest.mark.parametrize("src", ["foo:bar", "s3://bucket/x"])
def test_unknown_scheme_lists_schemes(src):
    with pytest.raises(UnineuronsError, match="unknown source scheme.*jsonl:PATH.*stdlib"):
        open_source(src)


def test_missing_path(tmp_path):
    with pytest.raises(UnineuronsError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(UnineuronsError, match="does not exist"):
        open_source(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_split_depends_on_text_only():
    splits = [split_of(t, 0.3) for t in TEXTS]
    assert 5 < splits.count("heldout") < 35
    assert splits == [split_of(t, 0.3) for t in TEXTS]
    assert all(split_of(t, 0.0) == "train" for t in TEXTS)
    assert order_key(TEXTS[0], 0) != order_key(TEXTS[0], 1)


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_shuffled_documents_is_a_sorted_split_whatever_the_budget(tmp_path, split):
    src = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    src = f"jsonl:{src}"
    in_split = [t for t in TEXTS if split == "all" or split_of(t, 0.3) == split]
    expected = sorted(in_split, key=lambda t: order_key(t, 7))
    # A tiny budget forces many passes; the stream must not change.
    for hint in (1, 50, 10**9):
        got = [d.text for d in ShuffledDocuments(src, split, 0.3, seed=7, chars_hint=hint)]
        assert got == expected
    other_seed = [d.text for d in ShuffledDocuments(src, split, 0.3, seed=8, chars_hint=10**9)]
    assert sorted(other_seed) == sorted(expected) and other_seed != expected


def test_shuffled_documents_rejects_bad_fraction(tmp_path):
    with pytest.raises(UnineuronsError, match="heldout fraction"):
        ShuffledDocuments("stdlib", "train", 1.5, seed=0, chars_hint=10)
