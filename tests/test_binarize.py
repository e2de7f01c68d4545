"""The data pipeline's files and scripts: binarized_io, binarized_data.py, data_combinator.py, token_counts.py."""
from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import binarized_data
import numpy as np
import pytest
import token_counts
from conftest import ROOT
from helpers import Payload, checkpointed_argv, train_argv

import binarized_io
import causal_train
import checkpoints
from binarized_io import (
    HEADER_SIZE,
    CorpusWriter,
    InMemoryCorpus,
    load_corpus,
    load_token_counts,
    output_path,
)
from utils import CliError, run_cli

N_DOCS = 300  # documents of the stdlib corpus used by the CLI tests: enough for several batches


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, env=env, timeout=120
    )


def run_in_process(main, argv, caplog) -> int:
    """Run a script's main through run_cli, as the CLI does; return the exit status (0 on success)."""
    caplog.clear()
    try:
        run_cli(lambda: main(argv))
    except SystemExit as exc:
        return exc.code
    return 0


def sequences(path) -> list[list[int]]:
    corpus = load_corpus(path)
    return [corpus[i].tolist() for i in range(len(corpus))]


@pytest.fixture(scope="module")
def texts(corpus_lines) -> list[str]:
    """Documents with blank and whitespace-only rows mixed in (they must be skipped)."""
    out = []
    for i, line in enumerate(corpus_lines[:N_DOCS]):
        out.append(line)
        if i % 50 == 7:
            out.extend(["", "   \t "])
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, texts) -> dict[str, Path]:
    """The same rows as .txt, .jsonl (field `body`), .csv, save_to_disk Dataset/DatasetDict, a folder of .txt."""
    import datasets

    d = tmp_path_factory.mktemp("inputs")
    out = {"txt": d / "docs.txt", "jsonl": d / "docs.jsonl", "csv": d / "docs.csv"}
    out["txt"].write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(out["jsonl"], "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": i, "body": t}) + "\n")
    with open(out["csv"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "id"])
        writer.writerows([t, i] for i, t in enumerate(texts))
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.save_to_disk(str(d / "saved_dataset"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(d / "saved_dict"))
    out["saved_dataset"], out["saved_dict"] = d / "saved_dataset", d / "saved_dict"
    folder = d / "folder"
    folder.mkdir()
    half = len(texts) // 2
    (folder / "a.txt").write_text("\n".join(texts[:half]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(texts[half:]) + "\n", encoding="utf-8")
    out["folder"] = folder
    return out


def binarize_argv(tokenizer_dir, dump, *extra) -> list[str]:
    return ["--tokenizer_name", str(tokenizer_dir), "--dump_file", str(dump), "--batch_size", "64", "--seed", "3",
            "--cache_dir", str(Path(dump).parent / "hf_cache"), *extra]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, inputs, tokenizer_dir) -> Path:
    """The .txt input binarized in process, serially, in the default (mmap) format."""
    import binarized_data

    dump = tmp_path_factory.mktemp("baseline") / "out" / "wiki"
    return binarized_data.main(["--file_path", str(inputs["txt"]), *binarize_argv(tokenizer_dir, dump)])


# ---------------------------------------------------------------------------------------------
# binarized_io


@pytest.mark.parametrize("fmt", ["mmap", "pickle"])
def test_writer_round_trip_and_metadata(tmp_path, fmt):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 30522, size=n) for n in rng.integers(0, 50, size=200)]
    path = tmp_path / f"c.{fmt}"
    with CorpusWriter(path, fmt, vocab_size=30522, tokenizer_name="bert-base-uncased", seed=1) as writer:
        for s in seqs[:100]:
            writer.add(s)
        writer.add_batch(np.concatenate(seqs[100:]), [len(s) for s in seqs[100:]])
    corpus = load_corpus(path)
    got = [corpus[i].tolist() for i in range(len(corpus))]
    assert sorted(got) == sorted(s.tolist() for s in seqs)
    assert got != [s.tolist() for s in seqs]  # shuffled
    assert corpus.dtype == np.uint16 and corpus[0].dtype == np.uint16
    assert corpus.lengths.dtype == np.int64 and corpus.lengths.tolist() == [len(s) for s in got]
    assert corpus.n_tokens == sum(len(s) for s in seqs)
    if fmt == "mmap":
        assert (corpus.vocab_size, corpus.tokenizer_name) == (30522, "bert-base-uncased")
    else:
        assert (corpus.vocab_size, corpus.tokenizer_name) == (None, None)
        with open(path, "rb") as fh:  # the original's format: a plain list of uint16 arrays (read as NumPy arrays only)
            raw = binarized_io._NumpyOnlyUnpickler(fh).load()
        assert isinstance(raw, list) and all(isinstance(a, np.ndarray) and a.dtype == np.uint16 for a in raw)


def test_both_formats_hold_the_same_sequences_in_the_same_order(tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 70000, size=n) for n in rng.integers(1, 30, size=100)]
    got = {}
    for fmt in ("mmap", "pickle"):
        with CorpusWriter(tmp_path / fmt, fmt, vocab_size=70000, seed=5) as writer:
            for s in seqs:
                writer.add(s)
        corpus = load_corpus(tmp_path / fmt)
        assert corpus.dtype == np.int32  # vocabulary beyond uint16
        got[fmt] = [corpus[i].tolist() for i in range(len(corpus))]
    assert got["mmap"] == got["pickle"]


def test_mmap_corpus_is_memory_mapped_and_pickles_by_path(tmp_path):
    with CorpusWriter(tmp_path / "c.bin", vocab_size=100, seed=0) as writer:
        for n in range(1, 60):
            writer.add(np.arange(n) % 100)
    corpus = load_corpus(tmp_path / "c.bin")
    assert isinstance(corpus[3].base, np.memmap) or isinstance(corpus[3], np.memmap)
    blob = pickle.dumps(corpus)
    assert len(blob) < 1000  # the path, not the tokens
    clone = pickle.loads(blob)
    assert all(np.array_equal(clone[i], corpus[i]) for i in range(len(corpus)))


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with CorpusWriter(tmp_path / "c.bin", vocab_size=100) as writer:
            writer.add([1, 2, 3])
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="token id 100"):
        with CorpusWriter(tmp_path / "d.pickle", "pickle", vocab_size=100) as writer:
            writer.add([1, 100])
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_corrupt_files_are_detected(tmp_path):
    path = tmp_path / "c.bin"
    with CorpusWriter(path, vocab_size=100) as writer:
        for n in range(2, 40):
            writer.add(np.arange(n))
    data = path.read_bytes()
    for name, blob in {
        "short.bin": data[:-1],
        "header.bin": data[: HEADER_SIZE // 2],
        "long.bin": data + b"\0" * 8,
        "garbage.bin": b"hello world" * 10,
        "empty.bin": b"",
        "trunc.pickle": pickle.dumps([np.arange(5, dtype=np.uint16)] * 10, protocol=4)[:-20],
    }.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CliError, match=name):
            load_corpus(tmp_path / name)
    with pytest.raises(CliError, match="truncated"):
        load_corpus(tmp_path / "short.bin")
    with pytest.raises(CliError, match="missing.bin"):
        load_corpus(tmp_path / "missing.bin")


def test_pickle_loader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pickle"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps([Evil()], protocol=4))
    with pytest.raises(CliError, match="evil.pickle"):
        load_corpus(evil)
    assert not marker.exists()


def test_original_pickle_fixture_loads(shared_fixtures):
    corpus = load_corpus(shared_fixtures / "wikitext-demo" / "binarized_text.train.bert-base-uncased.pickle")
    assert len(corpus) == 1000 and corpus.n_tokens == 61864 and corpus.dtype == np.uint16
    assert (corpus.lengths.min(), corpus.lengths.max()) == (2, 466)
    assert all(corpus[i][0] == 101 and corpus[i][-1] == 102 for i in range(len(corpus)))


def test_token_counts_on_the_original_fixture(shared_fixtures, tmp_path):
    folder = shared_fixtures / "wikitext-demo"
    expected = pickle.loads((folder / "binarized_text.train.token_counts.bert-base-uncased.pickle").read_bytes())
    out = tmp_path / "counts.pickle"
    proc = run_script("token_counts.py", "--data_file", str(folder / "binarized_text.train.bert-base-uncased.pickle"),
                      "--token_counts_dump", str(out), "--vocab_size", "30522")
    assert proc.returncode == 0, proc.stderr
    counts = pickle.loads(out.read_bytes())
    assert isinstance(counts, list) and type(counts[0]) is int
    assert counts == expected

    # The same corpus as .bin counts the same, with the vocabulary size read from the file.
    import token_counts

    corpus = load_corpus(folder / "binarized_text.train.bert-base-uncased.pickle")
    with CorpusWriter(tmp_path / "wiki.bin", vocab_size=30522, seed=0) as writer:
        for seq in corpus:
            writer.add(seq)
    token_counts.main(["--data_file", str(tmp_path / "wiki.bin"), "--token_counts_dump", str(tmp_path / "c2.pickle")])
    assert pickle.loads((tmp_path / "c2.pickle").read_bytes()) == expected


def test_token_counts_refuses_ids_beyond_the_vocabulary(tmp_path, caplog):
    import token_counts

    data = tmp_path / "c.pickle"
    with CorpusWriter(data, "pickle", vocab_size=None, seed=0, dtype=np.uint16) as writer:
        writer.add([1, 2, 977, 3])
    out = tmp_path / "counts.pickle"
    code = run_in_process(token_counts.main, ["--data_file", str(data), "--token_counts_dump", str(out),
                                              "--vocab_size", "500"], caplog)
    assert code != 0 and "977" in caplog.text and str(data) in caplog.text
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# binarized_data.py


def test_output_name():
    assert output_path("d/x", "train", "bert-base-uncased", "pickle") == Path("d/x.train.bert-base-uncased.pickle")
    assert output_path("x", "dev", "/a/b/mytok/", "mmap") == Path("x.dev.mytok.bin")
    assert output_path("x", "train", "google-bert/bert-base-uncased", "mmap") == Path("x.train.bert-base-uncased.bin")


def test_binarize_round_trip(baseline, texts, tokenizer, tokenizer_dir):
    assert baseline.name == f"wiki.train.{tokenizer_dir.name}.bin"
    corpus = load_corpus(baseline)
    assert (corpus.vocab_size, corpus.tokenizer_name, corpus.dtype) == (len(tokenizer), tokenizer_dir.name, np.uint16)
    assert len(corpus) == sum(1 for t in texts if t.strip())
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    decoded = []
    for i in range(len(corpus)):
        ids = corpus[i].tolist()
        assert ids[0] == cls_id and ids[-1] == sep_id and cls_id not in ids[1:-1]
        decoded.append("".join(tokenizer.decode(ids[1:-1]).split()))
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str
    expected = ["".join(normalize(t).split()) for t in texts if t.strip()]
    assert sorted(decoded) == sorted(expected)
    assert any(c.isupper() for t in texts for c in t)  # so the comparison above checks the lower-casing


def test_binarize_function_matches_the_script(baseline, texts, tokenizer):
    from binarize import binarize

    got = binarize(texts, tokenizer, "bert", batch_size=7)
    assert sorted(a.tolist() for a in got) == sorted(sequences(baseline))


def test_fast_process_gives_the_serial_ids(tmp_path, inputs, tokenizer_dir, caplog):
    import binarized_data

    args = ["--file_path", str(inputs["jsonl"]), "--field_name", "body", "--max_parsing_example", "250"]
    serial = binarized_data.main([*args, *binarize_argv(tokenizer_dir, tmp_path / "serial")])
    proc = run_script("binarized_data.py", *args, *binarize_argv(tokenizer_dir, tmp_path / "fast"),
                      "--fast_process", "--preprocessing_num_workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr
    fast = tmp_path / serial.name.replace("serial", "fast")
    assert fast.read_bytes() == serial.read_bytes()
    rows = [json.loads(line)["body"] for line in inputs["jsonl"].read_text().splitlines()[:250]]
    assert len(load_corpus(serial)) == sum(1 for t in rows if t.strip()) < 250


@pytest.mark.parametrize("kind", ["jsonl", "csv", "saved_dataset", "saved_dict", "folder"])
def test_every_input_kind_gives_the_txt_result(kind, tmp_path, inputs, baseline, tokenizer_dir):
    import binarized_data

    extra = ["--field_name", "body"] if kind == "jsonl" else []
    out = binarized_data.main(["--file_path", str(inputs[kind]), *extra, *binarize_argv(tokenizer_dir, tmp_path / "x")])
    assert sequences(out) == sequences(baseline)


def test_pickle_format_matches_mmap(tmp_path, inputs, baseline, tokenizer_dir):
    import binarized_data

    out = binarized_data.main(["--file_path", str(inputs["txt"]), "--format", "pickle",
                               *binarize_argv(tokenizer_dir, tmp_path / "wiki")])
    assert out.suffix == ".pickle"
    assert sequences(out) == sequences(baseline)


def test_split_of_a_dataset_dict(tmp_path, inputs, tokenizer_dir):
    import binarized_data

    out = binarized_data.main(["--file_path", str(inputs["saved_dict"]), "--split", "validation",
                               *binarize_argv(tokenizer_dir, tmp_path / "x")])
    assert out.name.startswith("x.validation.") and len(load_corpus(out)) == 5


def _bad_inputs(inputs, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n", encoding="utf-8")
    (tmp_path / "broken.json").write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    return {
        "missing file": (["--file_path", str(tmp_path / "nope.txt")], "nope.txt"),
        "unknown split": (["--file_path", str(inputs["saved_dict"]), "--split", "dev"], "'dev'"),
        "missing field": (["--file_path", str(inputs["jsonl"]), "--field_name", "content"], "content"),
        "empty corpus": (["--file_path", str(tmp_path / "blank.txt")], "blank.txt"),
        "bad json": (["--file_path", str(tmp_path / "broken.json")], "broken.json"),
        "bad tokenizer": (["--file_path", str(inputs["txt"]), "--tokenizer_name", str(tmp_path / "no_tok")], "no_tok"),
        "unknown dataset": (["--dataset_name", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
        "empty folder": (["--file_path", str(tmp_path / "empty_dir")], "empty_dir"),
    }


def test_bad_inputs_fail_cleanly(tmp_path, inputs, tokenizer_dir, caplog):
    import binarized_data

    (tmp_path / "empty_dir").mkdir()
    out_dir = tmp_path / "out"
    for name, (args, culprit) in _bad_inputs(inputs, tmp_path).items():
        argv = [*args, *binarize_argv(tokenizer_dir, out_dir / "x")]
        if "--tokenizer_name" in args:  # the later flag wins in argparse; keep the bad one last
            argv += ["--tokenizer_name", args[args.index("--tokenizer_name") + 1]]
        code = run_in_process(binarized_data.main, argv, caplog)
        assert code == 2, name
        assert culprit in caplog.text, (name, caplog.text)
        if name == "missing field":
            assert "available fields: id, body" in caplog.text
        if name == "unknown split":
            assert "train, validation" in caplog.text
        written = [p for p in out_dir.glob("*") if p.name != "hf_cache"] if out_dir.exists() else []
        assert written == [], name


def test_bad_input_through_the_cli(tmp_path, inputs, tokenizer_dir):
    proc = run_script("binarized_data.py", "--file_path", str(inputs["csv"]), "--field_name", "body",
                      *binarize_argv(tokenizer_dir, tmp_path / "x"))
    assert proc.returncode == 2
    assert "'body'" in proc.stderr and "available fields: text, id" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("x.*"))


# ---------------------------------------------------------------------------------------------
# data_combinator.py


def _write(path, seqs, fmt="mmap", **kw):
    with CorpusWriter(path, fmt, **kw) as writer:
        for s in seqs:
            writer.add(s)
    return path


def test_combinator_merges_any_formats(tmp_path):
    rng = np.random.default_rng(2)
    wiki = [np.concatenate([[101], rng.integers(999, 30000, size=n), [102]]) for n in rng.integers(0, 60, 300)]
    left = _write(tmp_path / "left.pickle", wiki, "pickle", vocab_size=None, dtype=np.uint16)  # original format
    extra = [np.concatenate([[101], rng.integers(999, 30000, size=n), [102]]) for n in range(1, 80)]
    right = _write(tmp_path / "right.bin", extra, vocab_size=30522, tokenizer_name="bert-base-uncased")
    proc = run_script("data_combinator.py", "--file_path_left", str(left), "--file_path_right", str(right),
                      "--dump_file", str(tmp_path / "merged" / "wiki_extra"), "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "merged" / "wiki_extra.train.bert-base-uncased.bin"
    merged = load_corpus(out)
    want = sorted([w.tolist() for w in wiki] + [e.tolist() for e in extra])
    got = [merged[i].tolist() for i in range(len(merged))]
    assert sorted(got) == want and got != want
    assert merged.vocab_size == 30522


def test_combinator_two_pickles_keep_the_original_format(tmp_path):
    import data_combinator

    a = _write(tmp_path / "a.pickle", [np.arange(5), np.arange(3)], "pickle", vocab_size=None, dtype=np.uint16)
    b = _write(tmp_path / "b.pickle", [np.arange(7)], "pickle", vocab_size=None, dtype=np.uint16)
    out = data_combinator.main(["--file_path_left", str(a), "--file_path_right", str(b), "--format", "pickle",
                                "--tokenizer_name", "bert-base-uncased", "--dump_file", str(tmp_path / "m")])
    assert out.name == "m.train.bert-base-uncased.pickle"
    raw = pickle.loads(out.read_bytes())
    assert sorted(x.tolist() for x in raw) == sorted([list(range(5)), list(range(3)), list(range(7))])
    assert all(x.dtype == np.uint16 for x in raw)


def test_combinator_refuses_mismatched_vocabularies(tmp_path, caplog):
    import data_combinator

    bert = _write(tmp_path / "bert.bin", [np.arange(20)], vocab_size=30522, tokenizer_name="bert-base-uncased")
    cased = _write(tmp_path / "cased.bin", [np.arange(20)], vocab_size=28996, tokenizer_name="bert-base-cased")
    gpt = _write(tmp_path / "gpt.pickle", [np.array([50256, 40000, 50256])], "pickle", vocab_size=None, dtype=np.int32)
    small = _write(tmp_path / "small.pickle", [np.array([1, 2, 3])], "pickle", vocab_size=None, dtype=np.uint16)
    big_id = _write(tmp_path / "bigid.pickle", [np.array([101, 30600, 102])], "pickle", vocab_size=None,
                    dtype=np.uint16)
    for a, b in [(bert, cased), (bert, big_id), (gpt, small)]:
        out_dir = tmp_path / f"out_{a.stem}_{b.stem}"
        code = run_in_process(data_combinator.main, ["--file_path_left", str(a), "--file_path_right", str(b),
                                                     "--tokenizer_name", "t", "--dump_file", str(out_dir / "m")],
                              caplog)
        assert code == 2, (a, b)
        assert str(a) in caplog.text and str(b) in caplog.text and "different vocabularies" in caplog.text
        assert not out_dir.exists() or not list(out_dir.iterdir())


def test_in_memory_corpus_rejects_non_sequences():
    with pytest.raises(ValueError, match="sequence 1"):
        InMemoryCorpus([np.arange(3), np.zeros((2, 2), dtype=int)])


def test_a_token_changed_mid_file_is_detected(tmp_path):
    """Beyond the first and last MiB that the cheap fingerprint reads: only the full checksum sees it."""
    path = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    with CorpusWriter(path, vocab_size=1000, shuffle=False) as w:
        for _ in range(1500):
            w.add(rng.integers(0, 1000, 1000))
    assert load_corpus(path).verify_checksum()
    before = checkpoints.file_fingerprint(path)
    mid = HEADER_SIZE + 1_500_000
    with open(path, "r+b") as fh:
        fh.seek(mid)
        byte = fh.read(1)
        fh.seek(mid)
        fh.write(bytes([byte[0] ^ 1]))
    after = checkpoints.file_fingerprint(path)
    assert after["sha256_head_tail"] == before["sha256_head_tail"]
    with pytest.raises(CliError, match="differ from the checksum recorded"):
        load_corpus(path).verify_checksum()
    with pytest.raises(CliError, match="changed while the run used it"):
        checkpoints.check_fingerprint(path, before, after)


def test_a_bin_written_before_checksums_still_loads(tmp_path):
    import json

    import binarized_io as bio

    path = tmp_path / "old.bin"
    with CorpusWriter(path, vocab_size=100, shuffle=False) as w:
        w.add([1, 2, 3])
    head = bytearray(path.read_bytes()[:HEADER_SIZE])
    fields = list(bio._HEADER.unpack_from(head))
    meta = json.loads(head[bio._HEADER.size: bio._HEADER.size + fields[-1]])
    del meta[bio.CHECKSUM_KEY]  # what the previous version wrote
    blob = json.dumps(meta).encode()
    fields[-1] = len(blob)
    head[:] = b"\0" * HEADER_SIZE
    head[: bio._HEADER.size + len(blob)] = bio._HEADER.pack(*fields) + blob
    path.write_bytes(bytes(head) + path.read_bytes()[HEADER_SIZE:])
    corpus = load_corpus(path)
    assert corpus.recorded_checksum is None and corpus.verify_checksum() is False
    assert corpus[0].tolist() == [1, 2, 3]


def test_token_counts_pickle_cannot_run_code(distill_setup, tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "counts.pickle"
    with open(crafted, "wb") as fh:
        pickle.dump([1, 2, Payload(marker)], fh)
    with pytest.raises(CliError, match="counts.pickle: not a token counts file"):
        causal_train.main(checkpointed_argv(distill_setup, tmp_path / "r", 4, "--token_counts", str(crafted)))
    assert not marker.exists()


def test_token_counts_as_npy(distill_setup, tmp_path):
    import token_counts

    npy = tmp_path / "counts.npy"
    token_counts.main(["--data_file", str(distill_setup["data"]), "--token_counts_dump", str(npy)])
    assert load_token_counts(npy).tolist() == load_token_counts(distill_setup["counts"]).tolist()
    causal_train.main(checkpointed_argv(distill_setup, tmp_path / "r", 4, "--token_counts", str(npy), "--max_steps", "1"))
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_a_pickled_corpus_says_it_has_no_checksum(tmp_path, caplog):
    import pickle

    import numpy as np

    path = tmp_path / "c.pickle"
    path.write_bytes(pickle.dumps([np.arange(2, 20, dtype=np.uint16)]))
    load_corpus(path)
    assert f"{path}: a pickled corpus carries no checksum: a flipped bit or a damaged copy is read without a word; " \
           f"the .bin format" in caplog.text


def test_binarized_data_refuses_a_tokenizer_without_vocabulary(tmp_path, model_without_tokenizer, corpus_file):
    argv = ["--file_path", str(corpus_file), "--tokenizer_name", str(model_without_tokenizer),
            "--dump_file", str(tmp_path / "out" / "data")]
    with pytest.raises(CliError, match="--tokenizer_name .*no vocabulary"):
        binarized_data.main(argv)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_pickle_names_the_bin_of_the_same_stem(tmp_path, distill_setup):
    stem = tmp_path / "binarized_text.train.bert-base-uncased"
    shutil.copy(distill_setup["data"], f"{stem}.bin")
    for call in (lambda p: load_corpus(p), lambda p: token_counts.main(["--data_file", p, "--token_counts_dump",
                                                                        str(tmp_path / "counts.pickle")])):
        with pytest.raises(CliError, match=f"not found; {stem}.bin exists"):
            call(f"{stem}.pickle")
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--data_file") + 1] = f"{stem}.pickle"
    with pytest.raises(CliError, match=f"--data_file {stem}.pickle: binarized corpus not found; {stem}.bin exists"):
        causal_train.main(argv)
    # The reverse, and other names beside it.
    with CorpusWriter(tmp_path / "other.train.tok.pickle", fmt="pickle", vocab_size=10, seed=0) as writer:
        writer.add([1, 2, 3])
    with pytest.raises(CliError, match="other.train.tok.pickle exists"):
        load_corpus(tmp_path / "other.train.tok.bin")
    with pytest.raises(CliError, match="beside it: binarized_text.train.bert-base-uncased.bin"):
        load_corpus(tmp_path / "binarized_text.train.bert-base-cased.bin")


def test_binarized_data_help_states_the_naming_rule(capsys):
    with pytest.raises(SystemExit):
        binarized_data.main(["--help"])
    assert "{dump_file}.{split}.{tokenizer}" in capsys.readouterr().out


def test_fast_process_is_capped_at_the_cpus(tmp_path, corpus_file, tokenizer_dir, monkeypatch, caplog):
    monkeypatch.setattr(binarized_data, "available_cpus", lambda: 1)
    caplog.set_level(logging.WARNING)
    out = binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_name", str(tokenizer_dir), "--dump_file",
                               str(tmp_path / "d"), "--fast_process", "--preprocessing_num_workers", "48",
                               "--max_parsing_example", "50"])
    assert out.is_file() and "--preprocessing_num_workers 48: only 1 CPU(s) available, using 1 processes" in caplog.text
