"""The token store: layout, stream contents, determinism, splits, errors, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from unineurons.cli import main
from unineurons.corpus import ShuffledDocuments, split_of
from unineurons.errors import UnineuronsError
from unineurons.tokens import TokenStore, build_token_store

MANIFEST_KEYS = {"format_version", "kind", "source", "tokenizer", "ctx", "n_contexts",
                 "n_tokens", "split", "seed", "heldout_fraction", "dtype", "sha256",
                 "n_documents", "created_by"}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer))


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """jsonl corpus of 80 short distinct documents."""
    path = tmp_path_factory.mktemp("short") / "docs.jsonl"
    texts = [f"doc {i}: the value is {i * i}.\nnext line {i}" for i in range(80)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return f"jsonl:{path}", texts


def documents_in(store: TokenStore, tok) -> list[str]:
    """Decoded documents that lie whole in the store's stream (the last one may be cut)."""
    stream = np.asarray(store.tokens[:, 1:]).ravel().tolist()
    pieces, cur = [], []
    for t in stream:
        if t == store.eos_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    return [tok.decode(p) for p in pieces]


def test_tiny_store_layout(tiny_store, tiny_heldout_store, tok):
    store = TokenStore.open(tiny_store)
    m = store.manifest
    assert set(m) == MANIFEST_KEYS
    assert store.tokens.shape == (128, 64) and store.tokens.dtype == np.uint16
    assert isinstance(store.tokens, np.memmap)
    assert (m["n_contexts"], m["ctx"], m["n_tokens"], m["split"]) == (128, 64, 8192, "train")
    assert (store.bos_id, store.eos_id, store.pad_id) == (0, 1, 2)
    assert store.vocab_size == len(tok) == 512
    from unineurons.models.load import vocab_fingerprint

    assert store.vocab_sha256 == vocab_fingerprint(tok)
    assert store.newline_ids and all("\n" in tok.decode([i]) for i in store.newline_ids)
    assert tok.encode("\n", add_special_tokens=False)[0] in store.newline_ids
    assert (store.tokens[:, 0] == store.bos_id).all()
    assert not (store.tokens[:, 1:] == store.bos_id).any()
    held = TokenStore.open(tiny_heldout_store)
    assert held.tokens.shape == (32, 64) and held.manifest["split"] == "heldout"


def test_rows_are_bos_plus_the_seeded_document_stream(tiny_store, tiny_corpus, tok):
    store = TokenStore.open(tiny_store)
    stream = np.asarray(store.tokens[:, 1:]).ravel().tolist()
    expected, n_docs = [], 0
    for doc in ShuffledDocuments(tiny_corpus, "train", 0.1, seed=0, chars_hint=10**9):
        expected += tok(doc.text, add_special_tokens=False)["input_ids"] + [store.eos_id]
        n_docs += 1
        if len(expected) >= len(stream):
            break
    assert stream == expected[: len(stream)]  # doc EOS doc EOS ..., chopped into ctx-1 pieces
    assert stream.count(store.eos_id) >= 1
    assert store.manifest["n_documents"] == n_docs


def test_rebuild_is_byte_identical_and_seed_changes_order(tiny_store, tiny_corpus,
                                                         tiny_tokenizer, tmp_path):
    again = build_token_store(tiny_corpus, str(tiny_tokenizer), 64, 8192, tmp_path / "a")
    assert (again.path / "tokens.npy").read_bytes() == (tiny_store / "tokens.npy").read_bytes()
    assert again.manifest == TokenStore.open(tiny_store).manifest
    other = build_token_store(tiny_corpus, str(tiny_tokenizer), 64, 8192, tmp_path / "b",
                              seed=1)
    assert not np.array_equal(other.tokens, again.tokens)


def test_train_and_heldout_share_no_document(short_docs, tiny_tokenizer, tok, tmp_path):
    src, texts = short_docs
    kw = dict(heldout_fraction=0.3)
    train = build_token_store(src, str(tiny_tokenizer), 16, 10**6, tmp_path / "t", **kw)
    held = build_token_store(src, str(tiny_tokenizer), 16, 10**6, tmp_path / "h",
                             split="heldout", **kw)
    held2 = build_token_store(src, str(tiny_tokenizer), 16, 10**6, tmp_path / "h2",
                              split="heldout", seed=5, **kw)
    a, b, b2 = (set(documents_in(s, tok)) for s in (train, held, held2))
    assert a and b and not a & b
    assert a | b <= set(texts)
    assert all(split_of(t, 0.3) == "train" for t in a)
    assert all(split_of(t, 0.3) == "heldout" for t in b | b2)
    # The corpus ran out: n_contexts is what the split holds, not ceil(10**6 / 16).
    n_train = sum(len(tok(t)["input_ids"]) + 1 for t in texts if split_of(t, 0.3) == "train")
    assert train.n_contexts == n_train // 15
    assert train.manifest["n_tokens"] == train.n_contexts * 16


def test_special_token_text_in_a_document_is_plain_text(tiny_tokenizer, tmp_path, tok):
    (tmp_path / "c.txt").write_text("before <|endoftext|><|bos|> after " * 20)
    store = build_token_store(str(tmp_path / "c.txt"), str(tiny_tokenizer), 32, 32,
                              tmp_path / "s", heldout_fraction=0.0)
    assert not np.isin(store.tokens[:, 1:], [store.bos_id, store.eos_id, store.pad_id]).any()
    assert tok.decode(store.tokens[0, 1:]).startswith("before <|endoftext|><|bos|> after")


def test_uint32_when_ids_do_not_fit_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(str(tmp_path / "wl"))
    (tmp_path / "c.txt").write_text(" ".join(f"w{i}" for i in range(69_900, 70_000)))
    store = build_token_store(str(tmp_path / "c.txt"), str(tmp_path / "wl"), 8, 32,
                              tmp_path / "s", heldout_fraction=0.0)
    assert store.tokens.dtype == np.uint32 and store.manifest["dtype"] == "uint32"
    assert store.tokens[0, 1] == 69_903 and store.pad_id is None


def test_n_contexts_for_and_contexts(tiny_store):
    store = TokenStore.open(tiny_store)
    assert store.n_contexts_for(None) == 128
    assert [store.n_contexts_for(n) for n in (1, 64, 65, 8192)] == [1, 1, 2, 128]
    with pytest.raises(UnineuronsError, match="holds 8192 tokens.*fewer than the 8193"):
        store.n_contexts_for(8193)
    with pytest.raises(UnineuronsError, match="must be positive"):
        store.n_contexts_for(0)
    assert np.array_equal(store.contexts(), store.tokens)
    assert np.array_equal(store.contexts(640, start=3), store.tokens[3:10])
    assert store.contexts(640, start=10).shape == (0, 64)
    with pytest.raises(UnineuronsError, match="start row 11"):
        store.contexts(640, start=11)


def test_corpus_errors(tmp_path, tiny_tokenizer):
    tok = str(tiny_tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnineuronsError, match="is empty"):
        build_token_store(str(tmp_path / "empty"), tok, 64, 1000, tmp_path / "o")
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(UnineuronsError, match=r"has only \d+ tokens in split train, fewer than "
                                              "one context of 64"):
        build_token_store(str(tmp_path / "short.txt"), tok, 64, 1000, tmp_path / "o",
                          heldout_fraction=0.0)
    with pytest.raises(UnineuronsError, match="no documents in split heldout"):
        build_token_store(str(tmp_path / "short.txt"), tok, 4, 8, tmp_path / "o",
                          split="heldout", heldout_fraction=0.0)
    with pytest.raises(UnineuronsError, match="unknown source scheme"):
        build_token_store("foo:bar", tok, 64, 1000, tmp_path / "o")
    with pytest.raises(UnineuronsError, match="tokenizer .* does not exist"):
        build_token_store("stdlib", str(tmp_path / "no_tok"), 64, 1000, tmp_path / "o")
    with pytest.raises(UnineuronsError, match="cannot load a tokenizer"):
        build_token_store("stdlib", str(tmp_path / "empty"), 64, 1000, tmp_path / "o")
    with pytest.raises(UnineuronsError, match="--ctx 1"):
        build_token_store("stdlib", tok, 1, 1000, tmp_path / "o")
    # Nothing was left behind by the failed builds: no output, no temp folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "short.txt"]


def test_out_dir_rules(tiny_store, tiny_corpus, tiny_tokenizer, tmp_path):
    args = (tiny_corpus, str(tiny_tokenizer), 64, 640)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("user data")
    with pytest.raises(UnineuronsError, match="not made by unineurons"):
        build_token_store(*args, theirs)
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"]
    with pytest.raises(UnineuronsError, match="holds a unineurons 'tokenizer'"):
        build_token_store(*args, tiny_tokenizer)
    # An existing store is replaced as a whole; a failed rebuild leaves it as it was.
    own = tmp_path / "store"
    shutil.copytree(tiny_store, own)
    assert build_token_store(*args, own).n_contexts == 10
    with pytest.raises(UnineuronsError, match="fewer than one context"):
        build_token_store(str(tmp_path / "theirs" / "keep.txt"), str(tiny_tokenizer), 64, 640,
                          own, heldout_fraction=0.0)
    assert TokenStore.open(own).n_contexts == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "theirs"]


def test_open_errors(tiny_store, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(tiny_store, s)
    data = bytearray((s / "tokens.npy").read_bytes())
    data[-1] ^= 0xFF
    (s / "tokens.npy").write_bytes(bytes(data))
    with pytest.raises(UnineuronsError, match=r"is corrupt \(sha256 mismatch\)"):
        TokenStore.open(s)
    assert TokenStore.open(s, verify=False).n_contexts == 128

    def broken(edit) -> TokenStore:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_store, d)
        m = json.loads((d / "manifest.json").read_text())
        edit(d, m)
        (d / "manifest.json").write_text(json.dumps(m))
        return TokenStore.open(d)

    with pytest.raises(UnineuronsError, match="format version 2, newer"):
        broken(lambda d, m: m.update(format_version=2))
    with pytest.raises(UnineuronsError, match="lacks ctx"):
        broken(lambda d, m: m.pop("ctx"))
    with pytest.raises(UnineuronsError, match="manifest says uint16"):
        broken(lambda d, m: m.update(n_contexts=129))
    with pytest.raises(UnineuronsError, match="has no tokens.npy"):
        broken(lambda d, m: (d / "tokens.npy").unlink())
    bad = tmp_path / "bad_json"
    shutil.copytree(tiny_store, bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(UnineuronsError, match="not valid JSON"):
        TokenStore.open(bad)
    with pytest.raises(UnineuronsError, match="does not exist"):
        TokenStore.open(tmp_path / "nothing")


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tokenizer_train_tokens_build_and_info(tiny_corpus, tmp_path, capsys):
    tok, store = str(tmp_path / "tok"), str(tmp_path / "store")
    code, out, _ = run_cli(["tokenizer", "train", "--source", tiny_corpus, "--vocab-size",
                            "300", "--max-chars", "20000", "--out", tok], capsys)
    assert code == 0 and "written to" in out
    code, out, _ = run_cli(["tokens", "build", "--source", tiny_corpus, "--tokenizer", tok,
                            "--ctx", "32", "--n-tokens", "320", "--out", store, "--seed", "3"],
                           capsys)
    assert code == 0 and "10 contexts x 32" in out
    code, out, err = run_cli(["tokens", "info", store], capsys)
    assert code == 0 and "(verified)" in out and "seed 3" in out
    # a corpus smaller than asked: the store holds what there is, and says so
    code, out, err = run_cli(["tokens", "build", "--source", tiny_corpus, "--tokenizer", tok,
                              "--ctx", "32", "--n-tokens", str(10**9), "--out", str(tmp_path / "all")],
                             capsys)
    assert code == 0 and "fewer than the 1,000,000,000 asked for" in err


def test_cli_errors_are_one_line(tiny_store, tiny_tokenizer, tmp_path, capsys):
    build = ["tokens", "build", "--tokenizer", str(tiny_tokenizer), "--n-tokens", "64",
             "--out", str(tmp_path / "o")]
    for args in (build + ["--source", "foo:bar"], ["tokens", "info", str(tmp_path / "none")],
                 ["tokenizer", "train", "--source", "stdlib", "--vocab-size", "3", "--out",
                  str(tmp_path / "t")]):
        code, out, err = run_cli(args, capsys)
        assert code == 1, args
        assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
