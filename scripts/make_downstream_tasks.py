"""Build offline downstream tasks from the quickstart's shipped corpus, for fine-tuning distilled students.

Three tasks, split by document exactly as the quickstart splits the corpus (same fractions, same rule), so a
task's test examples come only from documents no student was distilled on and no task trained on:

  source         which documentation a paragraph comes from (8 classes: torch, numpy, scipy, scikit-learn,
                 transformers, datasets, stdlib, pydoc_topics): sequence classification;
  same_document  do two paragraphs come from the same document? (sentence pairs, balanced; negatives from
                 another document of the same source where there is one);
  replaced       which words of a paragraph were swapped for another word of the same part's text (each
                 with probability one half, drawn from the same word frequencies, so only context tells):
                 token classification.

Output: OUT/<task>/{train,validation,test}.jsonl in the columns run_glue.py reads from local files (no
--task_name; run_ner.py's `tokens` and `ner_tags` for `replaced`), and OUT/tasks.json: sizes, class balance
and the majority-class baseline of every part (over words for `replaced`). The same settings give the same
bytes. Fine-tune a student on one:

  python scripts/make_downstream_tasks.py --out tasks
  python run_glue.py --model_name_or_path STUDENT --train_file tasks/source/train.jsonl \\
      --validation_file tasks/source/test.jsonl --do_train --do_eval --output_dir ft/source
  python run_ner.py --model_name_or_path STUDENT --train_file tasks/replaced/train.jsonl \\
      --validation_file tasks/replaced/test.jsonl --do_train --do_eval --output_dir ft/replaced
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.quickstart.downstream import TASKS, build_tasks, labels_of, split_parts, write_tasks
from pipelines.quickstart.pipeline import SPLIT_SEED, SPLITS, add_split_args, check_split_args, read_shipped
from utils import CliError, check_output_parent, logger, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder to write the tasks into (made if missing).")
    add_split_args(parser)  # the quickstart's: give the same values to get its split
    parser.add_argument("--train_examples", type=int, default=4000,
                        help="Examples per task in the train part (source, replaced: at most this many "
                             "paragraphs; same_document: this many pairs). Default 4000.")
    parser.add_argument("--eval_examples", type=int, default=1000,
                        help="Examples per task in the validation and test parts each (default 1000).")
    parser.add_argument("--max_documents", type=int, default=None,
                        help="Use only the corpus's first N paragraphs, as the quickstart's test preset does "
                             "(default: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the example draws (default 0).")
    args = parser.parse_args(argv)
    check_split_args(args)
    for flag in ("train_examples", "eval_examples"):
        if getattr(args, flag) < 2:
            raise CliError(f"--{flag} must be at least 2, got {getattr(args, flag)}")
    if args.max_documents is not None and args.max_documents < 1:
        raise CliError(f"--max_documents must be positive, got {args.max_documents}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    check_output_parent(out / "tasks.json", "--out")
    lines, groups, manifest = read_shipped(args.max_documents)
    parts = split_parts(lines, groups, (args.validation_fraction, args.heldout_fraction))
    sizes = {"train": args.train_examples, "validation": args.eval_examples, "test": args.eval_examples}
    tasks = build_tasks(parts, sizes, args.seed)
    for task in TASKS:
        for name in SPLITS:
            if len(set(labels_of(tasks[task][name]))) < 2:
                raise CliError(f"the {name} part has too few documents for the {task} task (one class or none); "
                               f"raise --max_documents or the fractions")
    record = {"corpus_sha256": manifest["sha256"], "max_documents": args.max_documents, "split": SPLIT_SEED,
              "fractions": [args.validation_fraction, args.heldout_fraction], "seed": args.seed,
              "documents": {name: len(set(parts[name].documents)) for name in SPLITS}}
    result = write_tasks(out, tasks, record)
    for task in TASKS:
        t = result["tasks"][task]
        logger.info("%s: %s; majority baseline on test %.1f%%", task,
                    ", ".join(f"{name} {t[name]['examples']}" for name in SPLITS), 100 * t["test"]["majority_accuracy"])
    logger.info("wrote %s", out / "tasks.json")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cli(main)
