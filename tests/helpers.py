"""Builders for tests: tokenizers and tiny models made locally, never downloaded; and small shared checks."""
from __future__ import annotations

import json
import os
from pathlib import Path

# A causal_train.py run in a subprocess: one thread (bitwise equality with an in-process run needs the
# same kernels) and no hub.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def student_weights(folder) -> dict:
    """The tensors of `<folder>/model.safetensors`."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    """Two state dicts hold the same tensors, bitwise."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_wordpiece(lines, out_dir: Path, vocab_size: int = 2000) -> Path:
    """Train an uncased WordPiece tokenizer on `lines` and save it as a `BertTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(lines, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_bert(n_layers=4, hidden=32, heads=4, vocab=120, seed=0):
    """A small BertForMaskedLM built from a config (eval mode, no dropout)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).eval()


def tiny_distilbert(n_layers=2, hidden=32, heads=4, vocab=120, seed=1, dropout=0.0):
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=n_layers, n_heads=heads, hidden_dim=hidden * 2,
                           max_position_embeddings=128, dropout=dropout, attention_dropout=dropout,
                           sinusoidal_pos_embds=False)
    return DistilBertForMaskedLM(cfg).eval()


def tiny_gpt2(n_layers=2, hidden=32, heads=4, vocab=120, seed=2):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=n_layers, n_head=heads, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def make_distill_setup(root: Path, tokenizer_dir: Path, lines, *, t_layers=4, s_layers=2, hidden=32, heads=4):
    """Everything `causal_train.py` needs, built locally and small.

    Returns a dict of paths: teacher (BERT folder with its tokenizer), data (binarized corpus),
    counts (token counts pickle), student_config, student_weights (.pth), mapping (.nm).
    """
    import json
    import pickle

    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig

    from binarized_io import CorpusWriter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=t_layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=128))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    data = root / "data.bin"
    counts = np.zeros(vocab, dtype=np.int64)
    with CorpusWriter(data, fmt="mmap", vocab_size=vocab, tokenizer_name="tok", seed=0) as writer:
        for ids in tok(list(lines), add_special_tokens=True)["input_ids"]:
            arr = np.asarray(ids if len(ids) <= 120 else ids[:119] + ids[-1:], dtype=np.int64)
            writer.add(arr)
            np.add.at(counts, arr, 1)
    with open(root / "counts.pickle", "wb") as fh:
        pickle.dump(counts.tolist(), fh)
    cfg = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=s_layers, n_heads=heads, hidden_dim=hidden * 2,
                           max_position_embeddings=128, sinusoidal_pos_embds=False)
    cfg.to_json_file(root / "student.json")
    from transformers import DistilBertForMaskedLM

    torch.manual_seed(1)
    torch.save(DistilBertForMaskedLM(cfg).state_dict(), root / "student.pth")
    head_dim = hidden // heads
    mapping = {"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:{t_layers // 2}$H:[0:{heads}]$[0:{head_dim}]"],
         "student_variable_names": [f"$L:{s_layers // 2}$H:[0:{heads}]$[0:{head_dim}]"]},
        {"teacher_variable_names": [f"$L:{t_layers - 1}$H:0$[0:{head_dim}]"],
         "student_variable_names": [f"$L:{s_layers - 1}$H:0$[0:{head_dim}]"]},
    ]}
    (root / "mapping.nm").write_text(json.dumps(mapping))
    return {"teacher": root / "teacher", "data": data, "counts": root / "counts.pickle",
            "student_config": root / "student.json", "student_weights": root / "student.pth",
            "mapping": root / "mapping.nm"}


def train_argv(setup: dict, dump: Path, *extra: str, causal: bool = True) -> list[str]:
    """A causal_train.py command line for a `make_distill_setup` folder (CPU, a few steps)."""
    argv = [
        "--dump_path", str(dump), "--data_file", str(setup["data"]), "--token_counts", str(setup["counts"]),
        "--student_type", "distilbert", "--student_config", str(setup["student_config"]),
        "--student_pretrained_weights", str(setup["student_weights"]),
        "--teacher_type", "bert", "--teacher_name", str(setup["teacher"]),
        "--mlm", "--alpha_ce", "0.5", "--alpha_mlm", "0.5", "--alpha_clm", "0.0", "--alpha_cos", "0.1",
        "--n_gpu", "0", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--n_epoch", "1",
        "--learning_rate", "1e-3", "--warmup_prop", "0.0", "--log_interval", "5", "--num_workers", "0",
        "--no_progress", "--seed", "3",
    ]
    if causal:
        argv += ["--neuron_mapping", str(setup["mapping"]), "--alpha_causal_ce", "0.5", "--alpha_causal_cos", "0.1"]
    return argv + list(extra)


def load_bench():
    """bench/bench_train_step.py as a fresh module (a command, not a module of the repository: each test may patch
    its globals)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def head_losses_eager_and_compiled(s_feat, proj, t_feat, t_proj, rows, targets) -> tuple[list, list]:
    """`losses.head_losses` (T = 2, weights 0.4 KL and 0.6 LM) and its gradients, eager then with the compiled
    KL kernel: (eager, compiled), each [total, kl, lm, grad of s_feat, of the weight, of the bias]."""
    import losses

    def run():
        for p in (s_feat, proj.weight, proj.bias):
            p.grad = None
        total, kl, lm = losses.head_losses(s_feat, proj, t_feat, t_proj, rows, targets, 2.0, 0.4, 0.6)
        total.backward()
        return [total.detach(), kl, lm, s_feat.grad.clone(), proj.weight.grad.clone(), proj.bias.grad.clone()]

    eager = run()
    try:
        losses.use_compiled_kernels(True)
        compiled = run()
    finally:
        losses.use_compiled_kernels(False)
    return eager, compiled


def assert_same_numbers(out, second, arms) -> None:
    """Two quickstart folders hold bitwise the same corpus and tokenizer and the same reported numbers."""
    for path in ("corpus/train.txt", "corpus/validation.txt", "corpus/test.txt", "tokenizer/tokenizer.json"):
        assert (out / path).read_bytes() == (second / path).read_bytes(), path
    first, again = (json.loads((o / "summary.json").read_text()) for o in (out, second))
    assert first["teacher"]["perplexity"] == again["teacher"]["perplexity"]
    for ref in ("student_init", "random_student"):
        assert first[ref] == again[ref], ref
    for objective in arms:
        for key in ("perplexity", "iia", "effective_iia", "base_agreement", "steps", "untrained_site"):
            assert first[objective][key] == again[objective][key], (objective, key)
    assert first["flops_per_step"] == again["flops_per_step"]
    assert first["comparisons"] == again["comparisons"] and first["curves"] == again["curves"]
    assert first["tuning"] == again["tuning"]
    assert first["verdict"] == again["verdict"]


def run_together(script, *argvs: list[str], timeout: int = 1200) -> list:
    """`python script argv` for each argv, all at the same time, offline (the quickstarts: their single-process
    stages leave cores idle); a subprocess.CompletedProcess each, in order. Any still running at an error is
    killed."""
    import subprocess
    import sys

    from pipelines.quickstart.pipeline import QUICKSTART_ENV

    env = dict(os.environ, **QUICKSTART_ENV)
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=Path(script).resolve().parents[1],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def quickstart_twice(base: Path, argv: list[str]) -> list:
    """scripts/quickstart.py with `argv`, the same command twice from nothing at the same time, into `base/out` and
    `base/again`: [(output folder, completed process)] * 2, each checked to have succeeded."""
    outs = [base / "out", base / "again"]
    procs = run_together(Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py",
                         *[[*argv, "--out", str(out)] for out in outs])
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return list(zip(outs, procs))


def in_memory_distiller(argv: list[str], teacher, student, t_sites, s_sites, vocab: int, mlm: bool = True):
    """A CausalDistiller on the CPU over six random in-memory sequences (ids 5..vocab-1 between [CLS]=2 and
    [SEP]=3), built from causal_train's parser with `argv` as causal_train builds one (`build_from_models`: the
    teacher frozen), one mapping entry (t_sites -> s_sites) and, with `mlm`, uniform masking probabilities over
    the non-special ids. Not the master process: it logs nothing of its own."""
    import dataclasses

    import numpy as np
    import torch

    import causal_train
    from devices import single_process
    from distill_config import DistillConfig
    from distill_setup import build_from_models
    from lm_seqs_dataset import LmSeqsDataset
    from neuron_mapping import MappingEntry

    args = causal_train.build_parser().parse_args(argv)
    runtime = dataclasses.replace(single_process(), is_master=False)
    ids = {"cls_token": 2, "sep_token": 3, "pad_token": 0, "unk_token": 1, "mask_token": 4}
    config = DistillConfig.in_memory(args, runtime, ids, max_model_input_size=64)
    rng = np.random.default_rng(0)
    dataset = LmSeqsDataset(data=[np.r_[2, rng.integers(5, vocab, 14), 3] for _ in range(6)], max_model_input_size=64,
                            cls_id=2, sep_id=3, pad_id=0, unk_id=1, seed=0)
    probs = torch.ones(vocab)
    probs[:5] = 0
    entry = MappingEntry(index=0, teacher=t_sites, student=s_sites, teacher_names=(), student_names=())
    return build_from_models(config, teacher, student, dataset, probs if mlm else None, [entry]).distiller


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (a fixed one fails when it is taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpointed_argv(setup: dict, dump: Path, steps: int, *extra: str) -> list[str]:
    """`train_argv` for `steps` optimiser steps with a checkpoint and a log line at every step."""
    return train_argv(setup, dump, "--max_steps", str(steps), "--checkpoint_interval", "1", "--log_interval", "1",
                      *extra)


def two_epoch_argv(setup: dict, dump: Path, *extra: str) -> list[str]:
    """`train_argv` for two epochs with a checkpoint at every step, accumulation 2 and the crossway pairs (batch 16:
    about 18 batches an epoch; 2 epochs of ~35 batches of 8 would be long)."""
    return train_argv(setup, dump, "--batch_size", "16", "--n_epoch", "2", "--checkpoint_interval", "1",
                      "--log_interval", "4", "--gradient_accumulation_steps", "2", "--include_crossway", *extra)


class Payload:
    """What a crafted file would do: run a command (create `marker`) when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def start_process(argv: list[str], **kwargs):
    """`python argv...` from the repository root, its output (stdout and stderr together) readable as text lines."""
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def read_until(proc, needle: str, log: list[str], seconds: float = 300) -> None:
    """Read `proc`'s output lines into `log` until one holds `needle` (or `seconds` passed, or the output ended)."""
    import time

    deadline = time.time() + seconds
    for line in proc.stdout:
        log.append(line)
        if needle in line or time.time() > deadline:
            return


def glue_args(out: Path, tmp_path: Path) -> list[str]:
    """run_glue.py's arguments for 4 training steps on a 16-row SST-2 file written into `tmp_path` (CPU, seeded,
    a checkpoint every 2 steps), into `out`."""
    rows = ["sentence,label"] + [f"{w} film,{i % 2}" for i, w in enumerate(["good", "bad", "great", "dull"] * 4)]
    data = tmp_path / "sst2.csv"
    data.write_text("\n".join(rows) + "\n")
    return [
        "--task_name", "sst2", "--train_file", str(data), "--validation_file", str(data), "--output_dir", str(out),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_steps", "2", "--max_steps", "4",
        "--cache_dir", str(tmp_path / "cache"),
    ]
