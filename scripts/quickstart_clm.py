"""The causal-LM quickstart: `scripts/quickstart.py --family llama` (or `--family gpt2`).

The same offline pipeline as the BERT quickstart (same corpus, split, stages, markers, resumption
and report), with a decoder-only teacher:

  2 tokenizer   a byte-level BPE tokenizer with <s>, </s> and <pad>, trained on the train part
  3 teacher     a small Llama (grouped-query attention, rotary positions, RMSNorm) or GPT-2 trained
                from scratch: run_clm.py --do_train
  4 data        scripts/binarized_data.py --tokenizer_type llama|gpt2 (BOS text EOS; no token counts)
  5 student     scripts/extract.py --model_type llama|gpt2, the student config (the teacher's at the
                student's depth) and a DIITO neuron mapping
  6 students    causal_train.py per seed, standard distillation (ce + clm + cos) and DIITO (+ causal_ce)
  7 evaluation  run_clm.py --do_eval: held-out perplexity over fixed EOS-separated blocks
  8 report      <out>/report.md with a table and plots
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
from dataclasses import replace
from pathlib import Path

import quickstart_report as qr
from extraction import student_config
from quickstart_pipeline import ALPHA_CAUSAL_CE, PRESETS, TEACHER_SEED, Preset, Quickstart, load_fast_tokenizer
from utils import CliError, atomic_write_text

CLM_FAMILIES = ("llama", "gpt2")
NAMES = {"llama": "Llama", "gpt2": "GPT-2"}
# The BERT quickstart's objective with the causal-LM loss in place of the masked-LM one.
ALPHAS = {"alpha_ce": 0.25, "alpha_clm": 0.25, "alpha_cos": 0.25, "alpha_mlm": 0.0}
SPECIALS = ["<pad>", "<s>", "</s>"]
COLORS = {"standard": "tab:blue", "diito": "tab:orange"}
OBJECTIVES = ("standard", "diito")  # (the BERT quickstart's equal-compute arm and IIA stage are not run here)
N_STAGES = 8


# Teacher steps of a causal-LM teacher per preset. The BERT presets' 1200 steps (~38 passes over the
# stdlib train part) let a causal LM memorise it: held-out perplexity 687, worse than its students.
# small: 600 steps (~19 passes), the held-out optimum of a Llama teacher: a 600-step run evaluated
# every 50 steps reached perplexity 67.5 at steps 550-600, flat there (docs/causal_lm.md). GPT-2,
# same sizes and corpus, takes the same count (not measured). gpu: the same number of passes at its
# 4x larger batch (not measured). test: the test suite's, unchanged.
TEACHER_STEPS = {"small": 600, "gpu": 150, "test": PRESETS["test"].teacher_steps}


def preset_for(name: str) -> Preset:
    """The BERT quickstart's preset of that name, with the causal-LM teacher's step count (`TEACHER_STEPS`)."""
    return replace(PRESETS[name], teacher_steps=TEACHER_STEPS[name])


def labels(family: str) -> dict[str, str]:
    return {**qr.LABELS, "teacher": f"teacher ({NAMES[family]})"}


def verdict(ppl: dict[str, dict[int, float]], seeds: list[int]) -> str:
    """One sentence: did DIITO reach a lower held-out perplexity than standard distillation, at equal steps?"""
    result, wins = qr.compare(ppl["diito"], ppl["standard"], seeds, lower_is_better=True)
    words = {"won": "DIITO won", "mixed": "Mixed result", "lost": "DIITO did not win"}
    return (f"{words[result]} at equal steps: mean held-out perplexity {statistics.fmean(ppl['diito'].values()):.2f} "
            f"for DIITO against {statistics.fmean(ppl['standard'].values()):.2f} for standard distillation "
            f"(DIITO lower on {wins} of {len(seeds)} seeds).")


def config_overrides(family: str, p: Preset) -> str:
    """run_clm.py --config_overrides for the teacher of `family` at preset `p`."""
    if family == "gpt2":  # (GPT-2's FFN is 4 x the width)
        return f"n_layer={p.teacher_layers},n_embd={p.hidden},n_head={p.heads},n_positions={p.max_seq_length}"
    kv_heads = p.heads // 2 if p.heads % 2 == 0 else p.heads  # grouped-query attention: 2 queries per key/value
    return (f"num_hidden_layers={p.teacher_layers},hidden_size={p.hidden},num_attention_heads={p.heads},"
            f"num_key_value_heads={kv_heads},intermediate_size={p.ffn},max_position_embeddings={p.max_seq_length},"
            f"tie_word_embeddings=false")


def train_bpe(lines: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer (<pad>, <s>, </s>) trained on `lines`, saved as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out_dir)
    return out_dir


def copy_tokenizer(name: str, out_dir: Path) -> None:
    """Save the --tokenizer into `out_dir`; CliError unless it has an EOS."""
    tok = load_fast_tokenizer(name)
    if tok.eos_token is None:
        raise CliError(f"--tokenizer {name}: has no EOS token, which a causal LM's documents need")
    tok.save_pretrained(out_dir)


class ClmQuickstart(Quickstart):
    """The pipeline's corpus and bookkeeping, with a causal-LM teacher, students and evaluation."""

    n_stages = N_STAGES
    eval_script = "run_clm.py"
    extract_script = "scripts/extract.py"

    def __init__(self, args, preset, user_docs):
        super().__init__(args, preset, user_docs)
        self.family = args.family
        self.labels = labels(self.family)

    def family_settings(self) -> dict:
        return {"family": self.family}

    def tokenizer_title(self) -> str:
        return f"byte-level BPE ({self.preset.vocab_size} entries) on the train part"

    def tokenizer_settings(self) -> dict:
        return {"kind": "bpe"}

    def make_tokenizer(self, folder: Path) -> int:
        from transformers import AutoTokenizer

        if self.args.tokenizer:
            copy_tokenizer(self.args.tokenizer, folder)
        else:
            lines = (self.out / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
            train_bpe(lines, folder, self.preset.vocab_size)
        return len(AutoTokenizer.from_pretrained(folder))

    def teacher_command(self, steps: int) -> tuple[str, str, list]:
        p = self.preset
        argv = [
            "--model_type", self.family, "--config_overrides", config_overrides(self.family, p),
            "--tokenizer_name", self.out / "tokenizer", "--train_file", self.out / "corpus" / "train.txt",
            "--block_size", p.max_seq_length,
            "--do_train", "--max_steps", steps, "--per_device_train_batch_size", p.teacher_batch,
            "--learning_rate", p.teacher_lr, "--warmup_steps", max(1, steps // 16), "--weight_decay", 0.01,
            "--adam_beta2", 0.98, "--logging_steps", max(1, steps // 40), "--save_strategy", "no",
            "--report_to", "none", "--seed", TEACHER_SEED, "--dataloader_num_workers", 0,
            *self.trainer_device_args,
        ]
        title = (f"teacher: {NAMES[self.family]} {p.teacher_layers} layers x {p.hidden} from scratch, "
                 f"{steps} steps (run_clm.py --do_train)")
        return title, "run_clm.py", argv

    def extract_title_flags(self) -> tuple[str, ...]:
        return ("--model_type", self.family)

    def student_config_text(self, record: dict) -> str:
        from transformers import AutoConfig

        return student_config(AutoConfig.from_pretrained(self.out / "teacher"), record["teacher_layers"]).to_json_string()

    def eval_options(self) -> tuple[str, list]:
        p = self.preset
        common = [
            "--tokenizer_name", self.out / "tokenizer", "--validation_file", self.out / "corpus" / "heldout.txt",
            "--block_size", p.max_seq_length, "--do_eval", "--per_device_eval_batch_size", p.eval_batch,
            "--seed", 0, "--report_to", "none", "--dataloader_num_workers", 0,
            *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else []),
        ]
        return f"--block_size {p.max_seq_length}", common

    # 6
    def students(self, data: dict, init: dict) -> dict[str, dict]:
        p = self.preset
        steps = self.args.steps or p.student_steps
        runs = [(objective, seed) for seed in self.seeds for objective in OBJECTIVES]
        self.banner(6, f"students: causal_train.py, standard and DIITO, {steps} steps each, "
                            f"seeds {', '.join(map(str, self.seeds))} ({len(runs)} runs)")
        common = [
            "--data_file", self.out / "data" / data["data_file"],
            "--student_type", self.family, "--student_config", self.out / "student_init" / "student_config.json",
            "--student_pretrained_weights", self.out / "student_init" / "student_init.pth",
            "--teacher_type", self.family, "--teacher_name", self.out / "teacher",
            "--tokenizer_name", self.out / "tokenizer", *[x for k, v in ALPHAS.items() for x in (f"--{k}", v)],
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            "--max_steps", steps, "--n_epoch", 1000, "--batch_size", p.student_batch,
            "--max_model_input_size", p.max_seq_length,
            "--gradient_accumulation_steps", 1, "--learning_rate", p.student_lr, "--warmup_prop", 0.05,
            "--group_by_size", "--log_interval", max(1, steps // 25), "--checkpoint_interval", 0,
            "--save_total_limit", 1, "--num_workers", 0, *self.device_args,
        ]
        records = {}
        for i, (objective, seed) in enumerate(runs, 1):
            name = f"{objective}_seed{seed}"
            causal = ["--alpha_causal_ce", ALPHA_CAUSAL_CE, "--neuron_mapping", self.out / "student_init" / "diito.nm"] \
                if objective == "diito" else ["--alpha_causal_ce", 0.0]
            argv = [*common, *causal, "--seed", seed]
            settings = {"data": data["key"], "init": init["key"], "argv": [str(a) for a in argv]}
            print(f"  run {i}/{len(runs)}: {self.labels[objective]}, seed {seed}", flush=True)

            records[name] = self.student(name, argv, settings, {"objective": objective, "seed": seed, "steps": steps})
        return records

    # 8
    def report(self, stages: dict, students: dict, evals: dict) -> dict:
        self.banner(8, "report: table and plots")
        settings = self.report_settings("clm-1", stages=stages, students=students, evals=evals)

        def work(folder: Path) -> dict:
            summary = write_report(self, stages, students, evals)
            print(f"  {self.out / 'report.md'}", flush=True)
            return {"verdict": summary["verdict"]}

        return self.pipe.unit("report", self.out / "plots", settings, work,
                              ("heldout_perplexity.png", "training_losses.png", "../report.md", "../summary.json"))

    def run_stages(self) -> dict:
        stages = {}
        stages["corpus"] = corpus = self.corpus()
        stages["tokenizer"] = tokenizer = self.tokenizer(corpus)
        stages["teacher"] = teacher = self.teacher(corpus, tokenizer)
        stages["data"] = data = self.data(corpus, tokenizer, f"data: binarize the train part "
                                          f"(scripts/binarized_data.py --tokenizer_type {self.family})")
        stages["student_init"] = init = self.student_init(teacher)
        students = self.students(data, init)
        evals = self.evaluate(teacher, students)
        return self.report(stages, students, evals)


def write_report(q: ClmQuickstart, stages: dict, students: dict, evals: dict) -> dict:
    """Write `report.md`, `report_table.md`, `summary.json` and the two plots; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, preset, seeds, lab = q.out, q.preset, q.seeds, q.labels
    vocab = stages["tokenizer"]["vocab_size"]
    ppl = {obj: {s: evals[f"{obj}_seed{s}"]["perplexity"] for s in seeds} for obj in OBJECTIVES}
    train_s = {obj: [students[f"{obj}_seed{s}"]["train_seconds"] for s in seeds] for obj in OBJECTIVES}
    params = {"teacher": qr.count_parameters(out / "teacher"),
              "student": qr.count_parameters(out / "students" / f"standard_seed{seeds[0]}")}
    teacher_steps, student_steps = stages["teacher"]["steps"], students[f"standard_seed{seeds[0]}"]["steps"]

    rows = [
        "| model | layers x width | parameters | held-out perplexity | per seed | training steps | training time |",
        "|---|---|---|---|---|---|---|",
        f"| {lab['teacher']} | {preset.teacher_layers} x {preset.hidden} | {params['teacher'] / 1e6:.2f} M | "
        f"{evals['teacher']['perplexity']:.2f} | one teacher | {teacher_steps} | "
        f"{qr.format_seconds(stages['teacher']['train_seconds'])} |",
    ]
    for obj in OBJECTIVES:
        rows.append(
            f"| {lab[obj]} | {preset.student_layers} x {preset.hidden} | {params['student'] / 1e6:.2f} M | "
            f"{qr.plus_minus(list(ppl[obj].values()))} | {', '.join(f'{ppl[obj][s]:.2f}' for s in seeds)} | "
            f"{student_steps} per run | {qr.plus_minus(train_s[obj], '{:.0f}')} s per run |")
    table = "\n".join(rows) + "\n"
    sentence = verdict(ppl, seeds)
    cost_ratio = statistics.fmean(train_s["diito"]) / statistics.fmean(train_s["standard"])
    _plot_losses(out, students, seeds, lab, plt)
    _plot_perplexity(out, evals["teacher"]["perplexity"], ppl, seeds, vocab, lab, plt)

    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
               + ("GPU preset (--n_gpu 1 --bf16)" if preset.gpu else f"CPU only, {q.args.threads} thread(s) per process")
               + f", Python {platform.python_version()}")
    all_records = {**stages, **{f"students: {k}": v for k, v in students.items()},
                   **{f"evaluation: {k}": v for k, v in evals.items()}}
    stage_rows = [f"| {k} | {qr.format_seconds(v['seconds'])} | {v['finished']} |" for k, v in all_records.items()]
    atomic_write_text(out / "report.md", _report_markdown(q, table, sentence, stages, evals, vocab, student_steps,
                                                           cost_ratio, machine, stage_rows))
    atomic_write_text(out / "report_table.md", table)
    summary = {
        "preset": q.args.preset, "family": q.family, "seeds": seeds, "vocab_size": vocab, "verdict": sentence,
        "teacher": {"perplexity": evals["teacher"]["perplexity"], "parameters": params["teacher"],
                    "train_seconds": stages["teacher"]["train_seconds"], "steps": teacher_steps},
        **{obj: {"perplexity": ppl[obj], "mean": qr.mean_std(list(ppl[obj].values()))[0],
                 "std": qr.mean_std(list(ppl[obj].values()))[1], "parameters": params["student"],
                 "train_seconds": dict(zip(seeds, train_s[obj])), "steps": student_steps} for obj in OBJECTIVES},
        "stage_seconds": {k: v["seconds"] for k, v in all_records.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _plot_losses(out: Path, students: dict, seeds: list[int], lab: dict, plt) -> None:
    """The teacher's causal-LM loss and each student loss, one line per seed."""
    curves = {name: qr.read_loss_curves(out / "students" / name / "log" / "train") for name in students}
    names = [n for n in ("loss", "ce", "clm", "cos", "causal_ce") if any(n in c for c in curves.values())]
    teacher_curve = qr.teacher_loss_curve(out)
    ncols = min(3, len(names) + 1)
    nrows = math.ceil((len(names) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[len(names) + 1:]:
        ax.set_visible(False)
    axes[0].plot([s for s, _ in teacher_curve], [v for _, v in teacher_curve], color="black")
    axes[0].set_title("teacher: causal-LM loss (run_clm.py)")
    for ax, loss in zip(axes[1:], names):
        qr.plot_student_curves(ax, curves, students, loss, seeds, COLORS, lab)
        ax.set_title(f"students: {loss}")
    for ax in axes:
        ax.set_xlabel("step")
    if len(axes) > 1:
        axes[1].legend(fontsize=8)
    fig.suptitle("training losses (students: one line per seed)")
    fig.tight_layout()
    fig.savefig(out / "plots" / "training_losses.png", dpi=110)
    plt.close(fig)


def _plot_perplexity(out: Path, teacher_ppl: float, ppl: dict, seeds: list[int], vocab: int, lab: dict, plt) -> None:
    """Held-out perplexity: means ± std and the seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    models = [("teacher", [teacher_ppl], "0.3")] + \
        [(obj, [ppl[obj][s] for s in seeds], COLORS[obj]) for obj in OBJECTIVES]
    for x, (model, values, color) in enumerate(models):
        mean, std = qr.mean_std(values)
        ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="D", color=color, capsize=6, ms=8)
        ax.scatter([x + 0.12] * len(values), values, color=color, s=14, alpha=0.7)
        ax.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points", xytext=(-14, 9), fontsize=8)
    ax.set_xticks(range(len(models)), [lab[m] for m, _, _ in models])
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"held-out causal-LM perplexity (chance: {vocab})\nlarge marker: mean ± std; dots: seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots" / "heldout_perplexity.png", dpi=110)
    plt.close(fig)


def _report_markdown(q: ClmQuickstart, table: str, sentence: str, stages: dict, evals: dict, vocab: int,
                     student_steps: int, cost_ratio: float, machine: str, stage_rows: list[str]) -> str:
    """The text of report.md."""
    preset, seeds, corpus, teacher_steps = q.preset, q.seeds, stages["corpus"], stages["teacher"]["steps"]
    return f"""# Quickstart report (causal LM: {NAMES[q.family]})

{dt.date.today().isoformat()}, preset `{q.args.preset}`, `--family {q.family}`, {machine}.

## Result

{table}
{sentence}

- Held-out perplexity is `run_clm.py --do_eval` on {corpus['heldout_documents']} held-out documents
  ({corpus['heldout_words']} words), each closed with EOS, concatenated and cut into fixed blocks of
  {preset.max_seq_length} tokens ({evals['teacher'].get('eval_samples')} blocks), the same for every model:
  exp of the mean next-token cross-entropy. Chance is the vocabulary size, {vocab}.
- Standard distillation: `--alpha_ce 0.25 --alpha_clm 0.25 --alpha_cos 0.25`. DIITO adds
  `--alpha_causal_ce {ALPHA_CAUSAL_CE}` with `student_init/diito.nm`: the output of each student block is aligned,
  full width, with that of the teacher block it was copied from (teacher blocks
  {stages['student_init']['teacher_layers']}). Both start from the same extracted student and run {student_steps}
  steps of {preset.student_batch} sequences with the same seed.
- Whether DIITO helps a causal LM is an open question; this is one small measurement. The comparison is at
  equal steps, not equal compute: DIITO's runs took {cost_ratio:.1f} times as long.
- Std is the sample standard deviation over seeds {', '.join(map(str, seeds))}.

![held-out perplexity](plots/heldout_perplexity.png)

![training losses](plots/training_losses.png)

## Set-up

- Corpus: {corpus['origin']}. Train part: {corpus['train_documents']} documents; held-out part:
  {corpus['heldout_documents']} documents; no document in both.
- Tokenizer: {vocab} entries ({'--tokenizer ' + q.args.tokenizer if q.args.tokenizer else 'byte-level BPE trained on the train part'}).
- Teacher: {NAMES[q.family]} (`{config_overrides(q.family, preset)}`), {teacher_steps} steps of
  {preset.teacher_batch} blocks of {preset.max_seq_length} tokens, learning rate {preset.teacher_lr}.
- Students: {preset.student_layers} block(s) of the same width from the teacher's (`scripts/extract.py`),
  learning rate {preset.student_lr}.
- Every command is in `commands.sh`, its output in `logs/`.

## Time per stage

| stage | wall time | finished |
|---|---|---|
{chr(10).join(stage_rows)}
"""


def checked_preset(name: str, family: str) -> Preset:
    """The preset for `family`; CliError if its sizes do not fit the family."""
    if family not in CLM_FAMILIES:
        raise CliError(f"--family {family}: the causal-LM quickstart knows {', '.join(CLM_FAMILIES)}")
    preset = preset_for(name)
    if preset.hidden % preset.heads:
        raise CliError(f"preset {name}: hidden size {preset.hidden} is not a multiple of {preset.heads} heads")
    return replace(preset)
