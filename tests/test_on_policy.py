"""on_policy.py and --on_policy_fraction: the student's own continuations of corpus prompts replace a share of the
batches; they are drawn the same on every run and every resume, scored on the sampled positions only, and a run
with them resumes bitwise after kill -9."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clm_helpers import llama_distill_setup, llama_train_argv
from conftest import ROOT
from helpers import SUBPROCESS_ENV, assert_same_weights, student_weights

import causal_train
from batching import BatchPreparer
from on_policy import OnPolicy


@pytest.fixture(scope="module")
def llama(tmp_path_factory, corpus_lines):
    root = tmp_path_factory.mktemp("on_policy")
    data, tok = llama_distill_setup(root, corpus_lines)
    return root, data, tok


def _sampler(tok, fraction=1.0, **kw) -> OnPolicy:
    settings = dict(fraction=fraction, prompt_tokens=4, new_tokens=6, temperature=1.0, top_k=0, seed=3,
                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_len=64)
    return OnPolicy(**{**settings, **kw})


def _batch(tok, lengths=(12, 9, 7)):
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.randint(5, len(tok), (len(lengths), width), generator=g)
    src = torch.randint(5, len(tok), (len(lengths), width), generator=g)
    lengths = torch.tensor(lengths)
    for t in (ids, src):
        t[torch.arange(width)[None] >= lengths[:, None]] = tok.pad_token_id
    return {"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": lengths.clone()}


def _student(root):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(root / "teacher").train()


def test_samples_continue_the_prompts_and_are_the_same_for_the_same_place(llama):
    root, _, tok = llama
    model, sampler, batch = _student(root), _sampler(tok), _batch(tok)
    args = dict(epoch=0, index=5, rank=0, device=torch.device("cpu"), autocast=None)
    out = sampler.sample_batch(model, batch, **args)
    assert model.training  # put back in training mode
    for side in ("base", "source"):
        ids, lengths, prompt = out[f"{side}_ids"], out[f"{side}_lengths"], out[f"{side}_prompt_lengths"]
        assert (prompt == 4).all() and torch.equal(ids[:, :4], batch[f"{side}_ids"][:, :4])  # the corpus's prompt
        assert ((lengths > 4) & (lengths <= 10)).all() and ids.shape[1] == 10
        for row, n in zip(ids, lengths.tolist()):
            sampled = row[4:n].tolist()
            assert tok.eos_token_id not in sampled[:-1]  # a sequence ends at its first EOS
            assert (row[n:] == tok.pad_token_id).all()
    again = sampler.sample_batch(model, batch, **args)
    assert all(torch.equal(out[k], again[k]) for k in out)  # the same place, the same samples
    other = sampler.sample_batch(model, batch, **{**args, "index": 6})
    assert not torch.equal(out["base_ids"], other["base_ids"])
    # a prompt never takes a whole sequence of the batch: at least one of its tokens is left to predict
    short = sampler.sample_batch(model, _batch(tok, (12, 3, 7)), **args)
    assert (short["base_prompt_lengths"] == 2).all()


def test_the_share_of_batches_and_the_rows_that_are_scored(llama):
    root, _, tok = llama
    half = _sampler(tok, fraction=0.5)
    picks = [half.chosen(epoch=1, index=i) for i in range(2000)]
    assert 0.45 < sum(picks) / len(picks) < 0.55 and picks == [half.chosen(1, i) for i in range(2000)]
    assert not any(_sampler(tok, fraction=0.0).chosen(0, i) for i in range(50))
    # only the rows that predict a sampled token (and the last) carry soft targets; there is no LM target
    out = _sampler(tok).sample_batch(_student(root), _batch(tok), 0, 0, 0, torch.device("cpu"), None)
    prep = BatchPreparer(mlm=False, vocab_size=len(tok), interchange_prop=0.3).prepare(out, causal=True)
    width = out["base_ids"].shape[1]
    rows = [(int(i) // width, int(i) % width) for i in prep.logit_idx]
    for b, n in enumerate(out["base_lengths"].tolist()):
        assert [t for r, t in rows if r == b] == list(range(3, n))  # from the prompt's last token (P - 1) on
    assert prep.lm_rows.numel() == 0 and prep.lm_targets.numel() == 0
    plain = BatchPreparer(mlm=False, vocab_size=len(tok), interchange_prop=0.3).prepare(_batch(tok), causal=True)
    assert plain.lm_rows.numel() > 0  # a corpus batch keeps its LM targets


@pytest.mark.e2e
def test_an_on_policy_run_resumes_bitwise_after_kill9(llama, tmp_path):
    root, data, _ = llama
    flags = ("--on_policy_fraction", "0.5", "--on_policy_new_tokens", "6", "--max_steps", "8",
             "--checkpoint_interval", "1", "--log_interval", "1")

    def argv(dump: Path, *extra):
        args = llama_train_argv(root, data, *flags, *extra)
        args[args.index("--dump_path") + 1] = str(dump)
        return args

    full = tmp_path / "full"
    proc = subprocess.run([sys.executable, "causal_train.py", *argv(full)], cwd=ROOT, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = tmp_path / "cut"
    killed = subprocess.Popen([sys.executable, "causal_train.py", *argv(cut)], cwd=ROOT, env=SUBPROCESS_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target, deadline = cut / "checkpoint-4", time.time() + 300
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert target.exists() and not (cut / "model.safetensors").exists(), "the run ended before the kill"
    resumed = subprocess.run([sys.executable, "causal_train.py", *argv(cut, "--resume")], cwd=ROOT,
                             env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(student_weights(cut), student_weights(full))
    # and the samples changed the run: without them the student differs
    plain = tmp_path / "plain"
    causal_train.main([*argv(plain)[:-len(flags)], "--max_steps", "8"])
    a, b = student_weights(plain), student_weights(full)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_on_policy_settings_are_checked():
    from argparse import Namespace

    from distill_setup import on_policy_checks
    from utils import CliError

    good = dict(mlm=False, fsdp=False, on_policy_fraction=0.5, on_policy_prompt_tokens=4, on_policy_new_tokens=8,
                on_policy_temperature=1.0, on_policy_top_k=0)
    on_policy_checks(Namespace(**good))
    for change, message in (({"fsdp": True}, "does not run with --fsdp yet"),
                            ({"on_policy_fraction": 1.5}, "--on_policy_fraction must be in \\[0, 1\\]"),
                            ({"on_policy_new_tokens": 0}, "--on_policy_new_tokens must be >= 1"),
                            ({"on_policy_temperature": 0.0}, "--on_policy_temperature must be > 0")):
        with pytest.raises(CliError, match=message):
            on_policy_checks(Namespace(**{**good, **change}))


@pytest.mark.e2e
def test_on_policy_under_torchrun_keeps_the_replicas_equal(llama, tmp_path):
    """Two CPU ranks sample their own batches at the same micro-steps: no rank waits on another, and DDP's
    replicas stay bitwise equal (causal_train.py checks them before saving)."""
    from helpers import free_port

    root, data, _ = llama
    args = llama_train_argv(root, data, "--on_policy_fraction", "0.5", "--on_policy_new_tokens", "6",
                            "--max_steps", "4")
    args[args.index("--dump_path") + 1] = str(tmp_path / "ddp")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "causal_train.py", *args], cwd=ROOT, env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "all 2 ranks hold identical student weights" in log
