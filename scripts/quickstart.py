"""Offline quickstart: the whole pipeline end to end on a small machine, ending with a report.

Chains the project's real scripts as a user would, each as its own command (collected in
`<out>/commands.sh`, its full output in `<out>/logs/`), with no model or dataset hub:

  1 corpus      English prose every Python has (the standard library's docstrings via
                scripts/stdlib_corpus.py, plus the prose of pydoc's topic help), or your own text
                (--text); split into train and held-out parts that share no document
  2 tokenizer   a WordPiece tokenizer learnt on the train part, reproducibly (or --tokenizer)
  3 teacher     a small BERT pretrained from scratch: run_mlm.py --do_train
  4 data        scripts/binarized_data.py and scripts/token_counts.py
  5 student     scripts/extract_distilbert.py, the student config and a DIITO neuron mapping (.nm)
  6 students    causal_train.py per seed: standard distillation and DIITO (same init, data, steps),
                and standard distillation given DIITO's compute (steps scaled by the FLOPs per step
                that scripts/count_step_flops.py counts for each objective)
  7 evaluation  run_mlm.py --do_eval on the held-out part, same masking for every model
  8 alignment   run_iia.py on the held-out part: IIA of every student with DIITO's mapping
                (and every block pair, --sweep, for the first seed's standard and DIITO students)
  9 report      <out>/report.md with a table, a verdict and plots (<out>/plots/*.png)

The terminal shows the stage lines, one progress bar for the running command and the final
summary. Each stage writes a `.done` marker last, recording the settings it ran with; a re-run
skips every stage (and every training run) whose marker matches, so an interrupted quickstart
resumes where it stopped. --force redoes everything. The same command gives the same numbers.
How long it takes: README.md, section "Quickstart" (one measured figure, with its machine).

    python scripts/quickstart.py
    python scripts/quickstart.py --preset test --seeds 1 --out /tmp/qs_test
    python scripts/quickstart.py --text my_book.txt --out ./qs_book
    python scripts/quickstart.py --preset gpu         # bigger models, longer runs, --n_gpu 1 --bf16
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quickstart_clm  # noqa: E402
from deterministic_wordpiece import train_wordpiece  # noqa: E402
from quickstart_pipeline import (ALPHA_CAUSAL_CE, OFFLINE_ENV, PRESETS, TEACHER_SEED, Quickstart,  # noqa: E402
                                 StageFailed, load_fast_tokenizer, read_text_files, split_corpus)
from quickstart_report import LABELS, OBJECTIVES, format_seconds, write_report  # noqa: E402
from utils import CliError, logger, run_cli  # noqa: E402

N_STAGES = 9
EVAL_MASK_SEED = 12345
# The distillation objective of the original recipe (README of Causal-Distill); DIITO adds the causal term.
ALPHAS = {"alpha_ce": 0.25, "alpha_mlm": 0.25, "alpha_cos": 0.25, "alpha_clm": 0.0}


def copy_tokenizer(name: str, out_dir: Path) -> None:
    """Save the --tokenizer into `out_dir`; CliError if it cannot serve a masked LM."""
    tok = load_fast_tokenizer(name)
    missing = [t for t in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token") if getattr(tok, t, None) is None]
    if missing:
        raise CliError(f"--tokenizer {name}: lacks {', '.join(missing)}, which a BERT-style masked LM needs")
    tok.save_pretrained(out_dir)


class MlmQuickstart(Quickstart):
    """The BERT quickstart: a masked-LM teacher, DistilBERT students at equal steps and equal compute, IIA."""

    n_stages = N_STAGES
    family = "bert"
    eval_script = "run_mlm.py"
    extract_script = "scripts/extract_distilbert.py"

    def tokenizer_title(self) -> str:
        return f"WordPiece ({self.preset.vocab_size} entries) on the train part"

    def make_tokenizer(self, folder: Path) -> int:
        if self.args.tokenizer:
            copy_tokenizer(self.args.tokenizer, folder)
        else:
            lines = (self.out / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
            train_wordpiece(lines, folder, self.preset.vocab_size)
        saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return len(set(saved["model"]["vocab"]) | {t["content"] for t in saved.get("added_tokens", [])})

    def teacher_command(self, steps: int) -> tuple[str, str, list]:
        p = self.preset
        overrides = (f"num_hidden_layers={p.teacher_layers},hidden_size={p.hidden},num_attention_heads={p.heads},"
                     f"intermediate_size={p.ffn},max_position_embeddings={p.max_seq_length}")
        argv = [
            "--model_type", "bert", "--config_overrides", overrides,
            "--tokenizer_name", self.out / "tokenizer", "--train_file", self.out / "corpus" / "train.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length,
            "--do_train", "--max_steps", steps, "--per_device_train_batch_size", p.teacher_batch,
            "--learning_rate", p.teacher_lr, "--warmup_steps", max(1, steps // 16), "--weight_decay", 0.01,
            "--adam_beta2", 0.98, "--train_sampling_strategy", "group_by_length",
            "--logging_steps", max(1, steps // 40), "--save_strategy", "no", "--report_to", "none",
            "--seed", TEACHER_SEED, "--dataloader_num_workers", 0, *self.trainer_device_args,
        ]
        title = (f"teacher: BERT {p.teacher_layers} layers x {p.hidden} from scratch, {steps} steps "
                 f"(run_mlm.py --do_train)")
        return title, "run_mlm.py", argv

    def after_binarize(self, folder: Path, data_file: Path) -> None:
        self.pipe.command("token_counts", "scripts/token_counts.py", [
            "--data_file", data_file, "--token_counts_dump", folder / "token_counts.pickle"])

    def student_config_text(self, record: dict) -> str:
        return json.dumps(record["student_config"], indent=2) + "\n"

    def eval_options(self) -> tuple[str, list]:
        p = self.preset
        common = [
            "--tokenizer_name", self.out / "tokenizer", "--validation_file", self.out / "corpus" / "heldout.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length, "--do_eval",
            "--per_device_eval_batch_size", p.eval_batch, "--eval_mask_seed", EVAL_MASK_SEED, "--seed", 0,
            "--report_to", "none", "--dataloader_num_workers", 0,
            *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else []),
        ]
        return f"--eval_mask_seed {EVAL_MASK_SEED}, --max_seq_length {p.max_seq_length}", common

    # 6
    def students(self, data: dict, init: dict) -> tuple[dict, dict[str, dict]]:
        """Standard and DIITO runs of `steps` steps per seed, then standard runs given a DIITO run's FLOPs."""
        p = self.preset
        steps = self.args.steps or p.student_steps
        self.banner(6, f"students: causal_train.py, standard and DIITO ({steps} steps each) and standard at "
                       f"DIITO's compute, seeds {', '.join(map(str, self.seeds))} ({3 * len(self.seeds)} runs)")
        common = [
            "--data_file", self.out / "data" / data["data_file"],
            "--token_counts", self.out / "data" / "token_counts.pickle",
            "--student_type", "distilbert", "--student_config", self.out / "student_init" / "student_config.json",
            "--student_pretrained_weights", self.out / "student_init" / "student_init.pth",
            "--teacher_type", "bert", "--teacher_name", self.out / "teacher", "--tokenizer_name", self.out / "tokenizer",
            "--mlm", *[x for k, v in ALPHAS.items() for x in (f"--{k}", v)],
            "--interchange_prop", 0.3, "--interchange_consecutive_only", "--freeze_pos_embs",
            "--n_epoch", 1000, "--batch_size", p.student_batch,
            "--gradient_accumulation_steps", 1, "--learning_rate", p.student_lr, "--warmup_prop", 0.05,
            "--group_by_size", "--checkpoint_interval", 0,
            "--save_total_limit", 1, "--num_workers", 0, *self.device_args,
        ]
        causal = {"standard": ["--alpha_causal_ce", 0.0],
                  "diito": ["--alpha_causal_ce", ALPHA_CAUSAL_CE, "--neuron_mapping", self.out / "student_init" / "diito.nm"]}

        # FLOPs per step of each objective, counted on the first seed's first batches (shapes only: no timing).
        def count(folder: Path) -> dict:
            result = {}
            for objective in ("standard", "diito"):
                self.pipe.command(f"flops_{objective}", "scripts/count_step_flops.py", [
                    "--out", folder / f"{objective}.json", "--batches", 4, "--",
                    *common, *causal[objective], "--max_steps", steps, "--seed", self.seeds[0], "--no_progress"])
                result[objective] = json.loads((folder / f"{objective}.json").read_text())["flops_per_step"]
            result["ratio"] = result["diito"] / result["standard"]
            print(f"  FLOPs per step: standard {result['standard'] / 1e9:.3g} G, DIITO {result['diito'] / 1e9:.3g} G "
                  f"(ratio {result['ratio']:.2f})", flush=True)
            return result

        flops = self.pipe.unit("flops", self.out / "flops", {"data": data["key"], "init": init["key"],
                                                            "argv": [str(a) for a in common], "steps": steps},
                               count, ("standard.json", "diito.json"))
        steps_of = {"standard": steps, "diito": steps, "standard_eqc": max(1, round(steps * flops["ratio"]))}
        runs = [(objective, seed) for objective in OBJECTIVES for seed in self.seeds]
        records = {}
        for i, (objective, seed) in enumerate(runs, 1):
            name = f"{objective}_seed{seed}"
            n = steps_of[objective]
            argv = [*common, *causal["diito" if objective == "diito" else "standard"], "--max_steps", n,
                    "--log_interval", max(1, n // 25), "--seed", seed]
            settings = {"data": data["key"], "init": init["key"], "argv": [str(a) for a in argv]}
            records[name] = self.student(
                name, argv, settings, {"objective": objective, "seed": seed, "steps": n},
                done_line=lambda seconds, i=i, objective=objective, seed=seed, n=n: (
                    f"  run {i}/{len(runs)}: {LABELS[objective]}, seed {seed}, {n} steps: {format_seconds(seconds)}"))
        return flops, records

    # 8
    def alignment(self, teacher: dict, init: dict, students: dict[str, dict]) -> dict[str, dict]:
        p = self.preset
        self.banner(8, f"alignment: IIA of {len(students)} students with the teacher (run_iia.py, DIITO's "
                       f"mapping, {p.iia_pairs} held-out pairs; every block pair for seed {self.seeds[0]})")
        common = [
            "--teacher_name", self.out / "teacher", "--tokenizer_name", self.out / "tokenizer",
            "--neuron_mapping", self.out / "student_init" / "diito.nm",
            "--data_file", self.out / "corpus" / "heldout.txt", "--max_seq_length", p.max_seq_length,
            "--num_pairs", p.iia_pairs, "--seed", 0, "--batch_size", 64,
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            *(["--device", "cuda", "--bf16"] if p.gpu else ["--device", "cpu"]),
        ]
        records = {}
        for name, rec in students.items():
            sweep = ["--sweep"] if rec["seed"] == self.seeds[0] and rec["objective"] in ("standard", "diito") else []
            argv = ["--student_name", self.out / "students" / name, *common, *sweep]
            settings = {"model": rec["key"], "teacher": teacher["key"], "init": init["key"],
                        "argv": [str(a) for a in argv]}

            def work(folder: Path, argv=argv, name=name) -> dict:
                self.pipe.command(f"iia_{name}", "run_iia.py", [*argv, "--output_dir", folder])
                overall = json.loads((folder / "iia_results.json").read_text())["mapping"]["overall"]
                print(f"  {name}: IIA {100 * overall['iia']['value']:.1f}%, effective IIA "
                      f"{100 * overall['effective_iia']['value']:.1f}%", flush=True)
                return {"iia": overall["iia"]["value"], "iia_ci95": overall["iia"]["ci95"],
                        "effective_iia": overall["effective_iia"]["value"]}

            records[name] = self.pipe.unit(f"iia {name}", self.out / "iia" / name, settings, work,
                                           ("iia_results.json",))
        return records

    # 9
    def report(self, stages: dict, students: dict, evals: dict, alignment: dict) -> dict:
        self.banner(9, "report: table, verdict and plots")
        settings = self.report_settings(4, stages=stages, students=students, evals=evals, alignment=alignment)

        def work(folder: Path) -> dict:
            summary = write_report(self.out, self.preset, self.args, stages, students, evals, alignment, self.seeds)
            print(f"  {self.out / 'report.md'}", flush=True)
            return {"verdict": summary["verdict"]}

        return self.pipe.unit("report", self.out / "plots", settings, work,
                              ("heldout_perplexity.png", "training_losses.png", "iia_heatmaps.png", "../report.md",
                               "../summary.json"))

    def run_stages(self) -> dict:
        stages = {}
        stages["corpus"] = corpus = self.corpus()
        stages["tokenizer"] = tokenizer = self.tokenizer(corpus)
        stages["teacher"] = teacher = self.teacher(corpus, tokenizer)
        stages["data"] = data = self.data(corpus, tokenizer, "data: binarize the train part and count its tokens "
                                          "(scripts/binarized_data.py, scripts/token_counts.py)",
                                          ("token_counts.pickle",))
        stages["student_init"] = init = self.student_init(teacher, ("--vocab_transform",))
        stages["flops"], students = self.students(data, init)
        evals = self.evaluate(teacher, students)
        alignment = self.alignment(teacher, init, students)
        return self.report(stages, students, evals, alignment)


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./quickstart_out", help="Output folder (default: ./quickstart_out).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="small (default): the size measured in README.md, section Quickstart; gpu: bigger models and "
                             "longer runs with --n_gpu 1 --bf16; test: the smallest size, for the test suite.")
    parser.add_argument("--family", choices=("bert", "llama", "gpt2"), default="bert",
                        help="Teacher family: bert (masked LM, the default), or a causal LM, llama or gpt2 "
                             "(run_clm.py; scripts/quickstart_clm.py).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per objective (default 3).")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per student run (default: the preset's).")
    parser.add_argument("--teacher_steps", type=int, default=None, help="Teacher training steps (default: the preset's).")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="Your own corpus instead of the standard library's prose: UTF-8 text files, "
                             "paragraphs separated by blank lines (if a file has any) or one document per line.")
    parser.add_argument("--tokenizer", default=None,
                        help="Use this tokenizer (local folder, or a hub name already in the cache) instead of "
                             "training one.")
    parser.add_argument("--heldout_fraction", type=float, default=0.1, help="Share of documents held out (default 0.1).")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="Threads per training process (default: half the cores; two processes fighting "
                             "over the same cores run several times slower).")
    parser.add_argument("--force", action="store_true", help="Redo every stage, even those already done.")
    args = parser.parse_args(argv)
    for flag in ("seeds", "steps", "teacher_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag} must be at least 1, got {value}")
    if not 0.0 < args.heldout_fraction <= 0.5:
        raise CliError(f"--heldout_fraction must lie in (0, 0.5], got {args.heldout_fraction}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart as `argv` asks; returns what ran, what was skipped and the wall time."""
    args = parse_args(argv)
    if args.family == "bert":
        preset = PRESETS[args.preset]
    else:
        preset = quickstart_clm.checked_preset(args.preset, args.family)
    user_docs = None
    if args.text:  # bad input fails here, before anything is written or trained
        user_docs = read_text_files(args.text)
        split_corpus(user_docs, args.heldout_fraction, "--text " + " ".join(args.text))
        if preset.max_documents:
            preset = replace(preset, max_documents=None)
    if args.tokenizer and args.tokenizer.startswith((".", "/", "~")) and not Path(args.tokenizer).expanduser().exists():
        raise CliError(f"--tokenizer {args.tokenizer}: no such folder")
    if preset.gpu:
        import torch

        if not torch.cuda.is_available():
            raise CliError("--preset gpu trains with --n_gpu 1 --bf16 and needs a CUDA GPU, which torch does not see "
                           "here; use --preset small on a CPU")
    os.environ.update(OFFLINE_ENV)

    def stop(signum, frame):  # SIGTERM (docker stop, Slurm): stop the running command as Ctrl-C does
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if args.family == "bert":
            return MlmQuickstart(args, preset, user_docs).run()
        return quickstart_clm.ClmQuickstart(args, preset, user_docs).run()
    except StageFailed as err:
        logger.error("%s", err)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        logger.error("stopped by %s: run the same command again to continue (finished stages are skipped; the "
                     "stage that was running starts again)", signal.Signals(signum).name)
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupted(Exception):
    """A signal asked the quickstart to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


if __name__ == "__main__":
    run_cli(main)
