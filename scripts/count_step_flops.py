"""FLOPs of one causal_train.py training step, counted on the run's own first batches.

Builds exactly what `causal_train.py` builds for the given command line (`distill_setup.build`:
models, data, masking, mapping, distiller), then runs its first --batches steps
(`CausalDistiller.step`) under torch's FlopCounterMode (every matmul of the forward and backward
passes, the vocabulary-wide losses included) and writes
the mean FLOPs per step as JSON. Nothing is trained or saved. The count depends only on the
shapes, so it is the same on every machine and every run: the quickstart uses it to give standard
distillation the compute of a DIITO run.

    python scripts/count_step_flops.py --out flops.json --batches 4 -- <causal_train.py arguments>
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from atomic_files import atomic_write_text
from utils import CliError, logger, run_cli


def count(train_argv: list[str], n_batches: int) -> dict:
    """Build the run of `train_argv` as causal_train.py does and count the FLOPs of its first `n_batches` steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from devices import count_cpu_flash_attention
    from distill_setup import build, build_parser, sanity_checks, start_runtime

    count_cpu_flash_attention()
    with tempfile.TemporaryDirectory() as tmp:
        args = build_parser().parse_args([*train_argv, "--dump_path", str(Path(tmp) / "run"), "--force"])
        sanity_checks(args)
        distiller = build(args, start_runtime(args)).distiller
        distiller.student.train()
        batches = distiller.epoch_batches(0)[:n_batches]
        flops, tokens = [], 0
        for batch in distiller.collated(batches):
            with FlopCounterMode(display=False) as counter:
                distiller.step([batch])
            flops.append(counter.get_total_flops())
            tokens += int(batch["base_lengths"].sum())
    return {"flops_per_step": sum(flops) / len(flops), "steps_counted": len(flops), "real_tokens": tokens,
            "flops_each": flops}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (flops_per_step, steps_counted, ...).")
    parser.add_argument("--batches", type=int, default=4, help="Micro-steps counted (the run's first ones; default 4).")
    if "--" not in argv:
        parser.parse_args(argv)  # --help, or an error naming what is missing
        raise CliError("put the causal_train.py arguments after `--`")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    if args.batches < 1:
        raise CliError(f"--batches must be at least 1, got {args.batches}")
    result = count(argv[split + 1:], args.batches)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    logger.info("%.4g FLOPs per step (mean of %d steps)", result["flops_per_step"], result["steps_counted"])
    return result


if __name__ == "__main__":
    run_cli(main)
