"""Offline quickstart: the whole pipeline end to end on a small machine, ending with a report.

Chains the project's real scripts as a user would, each as its own command (collected in
`<out>/commands.sh`, its full output in `<out>/logs/`), with no model or dataset hub:

  1 corpus      English prose: the standard library's docstrings, pydoc's topic help and the
                documentation of torch, transformers, numpy, scipy, scikit-learn and datasets, shipped
                in data/ (SHA-256 checked: the same bytes whatever is installed), or your own text
                (--text); split by document into train, validation and test parts
  2 tokenizer   a WordPiece tokenizer learnt on the train part, reproducibly (or --tokenizer)
  3 teacher     a small BERT pretrained from scratch: run_mlm.py --do_train (five, seeds 0 to 4, with
                --preset study)
  4 data        scripts/binarized_data.py and scripts/token_counts.py
  5 references  scripts/extract_distilbert.py: the student at initialisation (the teacher's blocks),
                its config, DIITO's neuron mapping (.nm) and a misaligned one; a random student of the
                same shape; the test perplexity of the teachers, the initialisations and the random student
  6 tuning      causal_train.py per seed, first teacher, read on the validation part: the standard
                objective's learning rate, then DIITO's weight at that rate (the same number of tries);
                and the ablation: each loss term alone, the seed's combination with and without
                smoothed MLM masking, the seed's recipe with DIITO's term
  7 students    causal_train.py per teacher and seed: standard distillation, DIITO, standard
                distillation given DIITO's compute (steps scaled by the FLOPs per step that
                scripts/count_step_flops.py counts), the seed's recipe, and DIITO's controls
                (weight-matched, source-KD, misaligned mapping); each evaluated with run_mlm.py
                --do_eval on the test part, the same masking for every model, the first teacher's runs
                at several points too (learning curves)
  8 alignment   run_iia.py on the test part: IIA, effective IIA and base agreement with DIITO's
                mapping (and at the misaligned sites DIITO did not train on) of the initialisation,
                the random student and every student of stage 7; every block pair (--sweep) for the
                initialisation and the first seed's standard and DIITO students
  9 report      <out>/report.md: a three-line verdict, the table (every arm as a change from the
                initialisation), DIITO against its controls, the curves, the tuning and ablation
                tables, plots (<out>/plots/*.png)

The terminal shows the stage lines, one progress bar for the running command and the final
summary. Each stage writes a `.done` marker last, recording the settings it ran with; a re-run
skips every stage (and every training run) whose marker matches, so an interrupted quickstart
resumes where it stopped. --force redoes everything. The same command gives the same numbers.
How long it takes: docs/quickstart.md (measured figures, with the machine and its load).

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

from pipelines.quickstart import clm
from pipelines.quickstart.mlm import MlmQuickstart
from pipelines.quickstart.environment import PINNED_KERNELS
from pipelines.quickstart.pipeline import (PRESETS, QUICKSTART_ENV, Preset, add_split_args, check_split_args,
                                          read_text_files, split_corpus)
from pipelines.stages import Interrupted, StageFailed, check_inputs_outside, check_out, lock_out
from atomic_files import atomic_write_text
from utils import CliError, logger, run_cli

MANIFEST = "quickstart.json"  # marks --out as the quickstart's (it replaces stage folders only there)
MANIFEST_TOOL = "causal-distill scripts/quickstart.py"


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./quickstart_out", help="Output folder (default: ./quickstart_out).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="small (default): the size measured in docs/quickstart.md; study: five teachers, the unit of "
                             "its verdicts, two student seeds each, DIITO's controls, the low-resource arms and the "
                             "`replaced` task, no ablation (times in docs/quickstart.md); gpu: bigger models and "
                             "longer runs with --n_gpu 1 --bf16; test: the smallest size, for the test suite.")
    parser.add_argument("--family", choices=("bert", "llama", "gpt2"), default="bert",
                        help="Teacher family: bert (masked LM, the default), or a causal LM, llama or gpt2 "
                             "(run_clm.py; pipelines/quickstart/clm.py).")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Student seeds per objective and teacher (default: the preset's, 3; 2 with --preset study).")
    parser.add_argument("--teachers", type=int, default=None,
                        help="Teachers trained with different seeds, each distilled by every main arm (default: the "
                             "preset's, 1; 5 with --preset study). The report's verdicts are tests over teachers: with "
                             "one it makes none and gives that teacher's figures; each teacher adds about a fifth of "
                             "the study's time.")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per student run (default: the preset's).")
    parser.add_argument("--teacher_steps", type=int, default=None, help="Teacher training steps (default: the preset's).")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="Your own corpus instead of the standard library's prose: UTF-8 text files, "
                             "paragraphs separated by blank lines (if a file has any) or one document per line.")
    parser.add_argument("--tokenizer", default=None,
                        help="Use this tokenizer (local folder, or a hub name already in the cache) instead of "
                             "training one.")
    add_split_args(parser)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="Threads per training process (default: half the cores; two processes fighting "
                             "over the same cores run several times slower).")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Training, evaluation and IIA commands run at once (default 1). With 2 cores, --jobs 2 "
                             "--threads 1 keeps both busy; the numbers do not change (each command is its own "
                             "seeded process), the wall times of single runs do.")
    parser.add_argument("--no_ablation", action="store_true",
                        help="Skip the ablation (each loss term alone, smoothing on and off, the seed's recipe "
                             "with DIITO; the tuning still runs): about a third of the student runs of a quickstart. "
                             "The report then says it was not run.")
    parser.add_argument("--no_downstream", action="store_true",
                        help="Skip the downstream tasks (stage 9: every model fine-tuned with run_glue.py on tasks built "
                             "from the corpus, scripts/make_downstream_tasks.py).")
    parser.add_argument("--no_tuning", action="store_true",
                        help="Skip the tuning on the validation part: standard distillation at the preset's learning "
                             "rate, DIITO at causal_ce 0.25. The report then says the recipes were not tuned.")
    parser.add_argument("--cpu_kernels", choices=("pinned", "native"), default="pinned",
                        help="pinned (default): PyTorch's and MKL's CPU kernels at their AVX2 level on x86-64, the code "
                             "paths every x86-64 CPU with AVX2 has (pipelines/quickstart/environment.py; how far that "
                             "carries the numbers to another CPU kind: docs/quickstart.md); "
                             "native: the CPU's own fastest code paths (AVX-512 where it has it): the numbers then "
                             "depend on the CPU kind (docs/quickstart.md measures by how much).")
    parser.add_argument("--no_preload", action="store_true",
                        help="Start every command as a fresh `python` process. By default commands are forked from "
                             "a server that imported torch and transformers once (pipelines/launcher.py), which saves "
                             "a few CPU-seconds per command (`ps` then shows them with the server's command line); the numbers "
                             "are the same either way.")
    parser.add_argument("--force", action="store_true", help="Redo every stage, even those already done.")
    args = parser.parse_args(argv)
    for flag in ("seeds", "teachers", "steps", "teacher_steps", "threads", "jobs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag} must be at least 1, got {value}")
    check_split_args(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} is a file, not a folder")
    return args


def chosen_preset(args: argparse.Namespace) -> Preset:
    """The preset the flags ask for: the family's sizes, and --teachers in place of the preset's count."""
    preset = PRESETS[args.preset] if args.family == "bert" else clm.checked_preset(args.preset, args.family)
    return preset if args.teachers is None else replace(preset, teachers=args.teachers)


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart as `argv` asks; returns what ran, what was skipped and the wall time."""
    args = parse_args(argv)
    preset = chosen_preset(args)
    user_docs = None
    if args.text:  # bad input fails here, before anything is written or trained
        user_docs = read_text_files(args.text)
        split_corpus(user_docs, (args.validation_fraction, args.heldout_fraction), "--text " + " ".join(args.text))
        if preset.max_documents:
            preset = replace(preset, max_documents=None)
    if args.tokenizer and args.tokenizer.startswith((".", "/", "~")) and not Path(args.tokenizer).expanduser().exists():
        raise CliError(f"--tokenizer {args.tokenizer}: no such folder")
    if preset.gpu:
        import torch

        if not torch.cuda.is_available():
            raise CliError("--preset gpu trains with --n_gpu 1 --bf16 and needs a CUDA GPU, which torch does not see "
                           "here; use --preset small on a CPU")
    out = Path(args.out).resolve()
    inputs = [("--text", t) for t in args.text or ()]
    if args.tokenizer and Path(args.tokenizer).expanduser().exists():  # (a hub name is no file of ours to guard)
        inputs.append(("--tokenizer", args.tokenizer))
    check_inputs_outside(out, inputs)
    lock = lock_out(out)  # one quickstart per --out at a time
    try:
        claim_out(out)
        return run(args, preset, user_docs)
    finally:
        lock.release()


def claim_out(out: Path) -> None:
    """Make --out the quickstart's own (new, empty or one of its outputs, else CliError) and mark it so."""
    if check_out(out, MANIFEST, MANIFEST_TOOL, "scripts/quickstart.py", legacy=made_by_an_older_quickstart) is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MANIFEST, json.dumps({"tool": MANIFEST_TOOL, "version": 1}, indent=2) + "\n")


def made_by_an_older_quickstart(out: Path) -> bool:
    """Outputs of a quickstart from before the manifest: its commands.sh opens with `# quickstart`."""
    try:
        with open(out / "commands.sh", encoding="utf-8") as fh:
            return fh.readline().startswith("# quickstart ")
    except OSError:
        return False


def run(args, preset, user_docs) -> dict:
    """The quickstart of --family, stopping cleanly on SIGTERM or Ctrl-C (exit 128 + the signal)."""
    os.environ.update(QUICKSTART_ENV)
    if args.cpu_kernels == "native":
        for name in PINNED_KERNELS:
            os.environ.pop(name, None)

    def stop(signum, frame):  # SIGTERM (docker stop, Slurm): stop the running command as Ctrl-C does
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if args.family == "bert":
            return MlmQuickstart(args, preset, user_docs).run()
        return clm.ClmQuickstart(args, preset, user_docs).run()
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


if __name__ == "__main__":
    run_cli(main)
