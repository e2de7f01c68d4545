"""run_iia.py: the invariants of interchange-intervention accuracy, its determinism, and bad input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import iia
import interventions
import run_iia
from losses import soft_target_kl
from utils import CliError

HIDDEN, HEADS = 32, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, corpus_lines):
    """A tiny BERT teacher (with its tokenizer), a random DistilBERT student, a GPT-2, held-out text, a mapping."""
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM,
                              GPT2Config, GPT2LMHeadModel)

    root = tmp_path_factory.mktemp("iia")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=64,
                                           max_position_embeddings=128, sinusoidal_pos_embds=False)
                          ).save_pretrained(root / "student")
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab + 8, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=64,
                                           max_position_embeddings=128)).save_pretrained(root / "other_vocab")
    torch.manual_seed(2)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=128)
                    ).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    (root / "heldout.txt").write_text("\n".join(corpus_lines[:120]) + "\n", encoding="utf-8")
    head_dim = HIDDEN // HEADS
    mapping = {"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:1$H:[0:{HEADS}]$[0:{head_dim}]"],
         "student_variable_names": [f"$L:1$H:[0:{HEADS}]$[0:{head_dim}]"]},
        {"teacher_variable_names": [f"$L:0$H:1$[0:{head_dim}]", f"$L:0$H:2$[0:4]"],
         "student_variable_names": [f"$L:0$H:1$[0:{head_dim}]", f"$L:0$H:2$[0:4]"]},
    ]}
    (root / "map.nm").write_text(json.dumps(mapping))
    return root


def _vocab(setup) -> int:
    return json.loads((setup / "teacher" / "config.json").read_text())["vocab_size"]


def run(setup, *extra, student="teacher", teacher="teacher", data="heldout.txt", mapping="map.nm", out="out"):
    argv = ["--teacher_name", str(setup / teacher), "--student_name", str(setup / student),
            "--tokenizer_name", str(setup / "teacher"), "--data_file", str(setup / data),
            "--output_dir", str(setup / out), "--num_pairs", "48", "--batch_size", "48", "--n_bootstrap", "200",
            "--no_progress", "--device", "cpu"]
    if mapping:
        argv += ["--neuron_mapping", str(setup / mapping)]
    return run_iia.main(argv + list(extra))


def test_teacher_as_student_agrees_exactly(setup):
    record = run(setup, "--sweep", "--num_pairs", "24", out="self")
    for row in record["mapping"]["entries"] + [record["mapping"]["overall"]]:
        assert row["iia"]["value"] == 1.0 and row["iia"]["ci95"] == [1.0, 1.0]
        assert row["effective_iia"]["value"] == 1.0
        assert row["changed_positions"] > 0 and row["kl"]["value"] == 0.0
    assert record["mapping"]["base_agreement"]["value"] == 1.0
    for row in record["sweep"]["entries"]:  # the same block of the same model: exact agreement
        if row["teacher_layers"] == row["student_layers"]:
            assert row["iia"]["value"] == 1.0 and row["effective_iia"]["value"] == 1.0
    assert len(record["sweep"]["entries"]) == 3 * 3
    saved = json.loads((setup / "self" / "iia_results.json").read_text())
    assert saved["mapping"]["overall"]["iia"]["value"] == 1.0
    assert (setup / "self" / "iia_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_causal_lm_teacher_as_student_evaluates_every_next_token_position(setup):
    head_dim = HIDDEN // HEADS
    (setup / "gpt2.nm").write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:0$H:[0:{HEADS}]$[0:{head_dim}]"],
         "student_variable_names": [f"$L:0$H:[0:{HEADS}]$[0:{head_dim}]"]}]}))
    record = run(setup, teacher="gpt2", student="gpt2", mapping="gpt2.nm", out="gpt2_self")
    overall = record["mapping"]["overall"]
    assert overall["iia"]["value"] == 1.0 and overall["effective_iia"]["value"] == 1.0
    # every real position that has a next token: sum over pairs of (length - 1)
    tok, special = run_iia.load_tokenizer_and_special_ids(str(setup / "teacher"), _vocab(setup), False)
    dataset = run_iia.load_pairs(str(setup / "heldout.txt"), tok, special, 128, 42)
    pairs = iia.choose_pairs(dataset, 48, 42)
    assert overall["positions"] == int(sum(dataset.lengths[pairs] - 1))


def test_random_student_is_near_chance(setup):
    record = run(setup, student="student", out="random")
    for row in record["mapping"]["entries"]:
        assert row["changed_positions"] > 20
        assert row["effective_iia"]["value"] < 0.2
        assert abs(row["effective_iia"]["value"] - row["chance"]) < 0.15
    assert record["mapping"]["base_agreement"]["value"] < 0.3


def _preparer(vocab):
    from batching import BatchPreparer

    return BatchPreparer(mlm=True, vocab_size=vocab, mask_id=4, token_probs=torch.ones(vocab), restrict_ce_to_mask=True,
                         interchange_prop=0.3, interchange_mode="random")


def test_positions_and_masks_repeat_and_are_shared_by_teacher_and_student(setup, monkeypatch):
    tok, special = run_iia.load_tokenizer_and_special_ids(str(setup / "teacher"), _vocab(setup), True)
    dataset = run_iia.load_pairs(str(setup / "heldout.txt"), tok, special, 128, 7)
    pairs = iia.choose_pairs(dataset, 40, 7)
    assert np.array_equal(pairs, iia.choose_pairs(dataset, 40, 7))
    torch.manual_seed(123)
    first = iia.prepare_batches(dataset, pairs, _preparer(len(tok)), 16, 7)
    torch.manual_seed(456)  # the global generator's state does not matter
    torch.rand(10)
    second = iia.prepare_batches(dataset, pairs, _preparer(len(tok)), 16, 7)
    other = iia.prepare_batches(dataset, pairs, _preparer(len(tok)), 16, 8)
    for a, b in zip(first, second):
        for key in ("input_ids", "mlm_mask", "logit_idx", "batch_idx", "base_pos", "source_pos", "source_ids"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert any(not torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, other))
    # evaluated positions are exactly the masked ones
    for p in first:
        assert torch.equal(p.logit_idx, p.mlm_mask.flatten().nonzero(as_tuple=True)[0])

    # Teacher and student runs write at the very same positions with the same masked input.
    calls = []
    original = interventions.interchange

    def spy(base, source, dims, batch_idx, base_pos, source_pos):
        calls.append((batch_idx.clone(), base_pos.clone(), source_pos.clone()))
        return original(base, source, dims, batch_idx, base_pos, source_pos)

    inputs = []
    original_run = interventions.run_model

    def run_spy(model, input_ids, attention_mask, **kw):
        inputs.append((model.config.model_type, input_ids.clone()))
        return original_run(model, input_ids, attention_mask, **kw)

    monkeypatch.setattr(interventions, "interchange", spy)
    monkeypatch.setattr(interventions, "run_model", run_spy)
    teacher = run_iia.load_lm(str(setup / "teacher"), "--teacher_name")
    student = run_iia.load_lm(str(setup / "student"), "--student_name")
    entries = iia.sweep_entries(teacher, student)[:2]
    iia.evaluate(teacher, student, first[:2], entries)
    assert len(calls) == 2 * 2 * 2  # batches x entries x (teacher, student)
    for t_call, s_call in zip(calls[0::2], calls[1::2]):
        assert all(torch.equal(a, b) for a, b in zip(t_call, s_call))
    kinds = [k for k, _ in inputs]
    assert "bert" in kinds and "distilbert" in kinds
    per_model = {}
    for kind, ids in inputs:
        per_model.setdefault(kind, []).append(ids)
    for t_ids, s_ids in zip(per_model["bert"], per_model["distilbert"]):
        assert torch.equal(t_ids, s_ids)


def test_same_command_same_numbers(setup):
    a = run(setup, student="student", out="rep_a")
    b = run(setup, student="student", out="rep_b")
    assert a["mapping"] == b["mapping"]


def test_kl_metric_is_the_soft_target_loss_at_t1():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g)
    torch.testing.assert_close(iia.kl_per_row(t, s).mean(), soft_target_kl(s, t, 1.0), rtol=1e-5, atol=1e-6)


def test_bootstrap_interval_covers_the_value_and_shrinks_with_pairs():
    rng = np.random.default_rng(0)
    small = rng.random(20) < 0.7
    large = rng.random(2000) < 0.7
    m_small = iia._metric(small.astype(float), np.ones(20), 500, 0)
    m_large = iia._metric(large.astype(float), np.ones(2000), 500, 0)
    for m in (m_small, m_large):
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert m_large["ci95"][1] - m_large["ci95"][0] < (m_small["ci95"][1] - m_small["ci95"][0]) / 3


def test_num_pairs_larger_than_the_data_warns_and_uses_all(setup, caplog):
    lines = (setup / "heldout.txt").read_text().splitlines()[:30]
    (setup / "few.txt").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="causal_distill"):
        record = run(setup, "--num_pairs", "1000", data="few.txt", out="few")
    tok, special = run_iia.load_tokenizer_and_special_ids(str(setup / "teacher"), _vocab(setup), True)
    n = len(run_iia.load_pairs(str(setup / "few.txt"), tok, special, 128, 42))
    assert record["mapping"]["pairs"] == n <= 30
    assert "--num_pairs 1000 is more than" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("mapping_too_deep", "student variable '$L:5"),
    ("vocab", "vocabularies differ"),
    ("family", "cannot be compared"),
    ("empty", "usable sequence"),
    ("missing_data", "no such file"),
    ("missing_model", "no such folder"),
    ("tokenizer", "--tokenizer_name"),
    ("nothing", "nothing to evaluate"),
])
def test_bad_input_is_a_clear_error(setup, case, message):
    kw = {}
    extra = []
    if case == "mapping_too_deep":
        (setup / "deep.nm").write_text(json.dumps({"interchange_variable_mappings": [
            {"teacher_variable_names": ["$L:1$H:0$[0:8]"], "student_variable_names": ["$L:5$H:0$[0:8]"]}]}))
        kw = {"student": "student", "mapping": "deep.nm"}
    elif case == "vocab":
        kw = {"student": "other_vocab"}
    elif case == "family":
        kw = {"student": "gpt2"}
    elif case == "empty":
        (setup / "empty.txt").write_text("\n\n")
        kw = {"data": "empty.txt"}
    elif case == "missing_data":
        kw = {"data": "nope.txt"}
    elif case == "missing_model":
        kw = {"student": "no_such_student"}
    elif case == "tokenizer":  # a student folder holds no tokenizer
        with pytest.raises(CliError, match=message):
            run_iia.main(["--teacher_name", str(setup / "teacher"), "--student_name", str(setup / "student"),
                          "--tokenizer_name", str(setup / "student"), "--data_file", str(setup / "heldout.txt"),
                          "--output_dir", str(setup / "bad"), "--sweep", "--device", "cpu"])
        return
    elif case == "nothing":
        kw = {"mapping": None}
    with pytest.raises(CliError, match=message.replace("$", r"\$").replace("(", r"\(")):
        run(setup, *extra, out="bad", **kw)
    assert not (setup / "bad" / "iia_results.json").exists()


def test_cli_exit_status_and_help(setup, repo_root):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "run_iia.py", "--help"], cwd=repo_root, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and "--sweep" in proc.stdout and "effective IIA" in proc.stdout
    proc = subprocess.run([sys.executable, "run_iia.py", "--teacher_name", str(setup / "teacher"), "--student_name",
                           str(setup / "gpt2"), "--data_file", str(setup / "heldout.txt"), "--output_dir",
                           str(setup / "bad_cli"), "--sweep"], cwd=repo_root, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2 and "cannot be compared" in proc.stderr and "Traceback" not in proc.stderr
    assert Path(setup / "bad_cli").exists() is False
