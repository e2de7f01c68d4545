"""Make one HF model folder of a sharded checkpoint of `causal_train.py --fsdp` (on request, at any time).

An --fsdp run writes its checkpoints sharded (`checkpoint-<step>/`: one `__<rank>_0.distcp` per
rank, DCP's `.metadata`, `training_state.pt`, `config.json`, `manifest.json`) and, at its end, the
consolidated student in `--dump_path`. This script does the consolidation for any of its
checkpoints, in one process and without torchrun or a GPU: the checkpoint is verified against its
manifest, the shards are read into a stock model of the student's family, and the folder is written
as `save_pretrained` writes it (`AutoModelForMaskedLM` / `AutoModelForCausalLM`, `run_glue.py`, ...
load it). It needs the host memory of the whole student, not of its optimizer state.

    python scripts/consolidate_checkpoint.py --checkpoint results/run/checkpoint-4000 --out results/student-4000
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils import CliError, check_output_parent, logger, require_file, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="A sharded checkpoint folder of causal_train.py --fsdp (checkpoint-<step>/).")
    p.add_argument("--out", required=True,
                   help="The HF model folder to write (config.json + model.safetensors); must not hold a model yet.")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    folder = require_file(args.checkpoint, "--checkpoint")
    if not folder.is_dir():
        raise CliError(f"--checkpoint {folder} is not a folder")
    out = check_output_parent(args.out, "--out", is_file=False)
    if (out / "model.safetensors").exists() or (out / "config.json").exists():
        raise CliError(f"--out {out} already holds a model; give a new folder")
    from sharded_checkpoints import consolidate

    consolidate(folder, out)
    logger.info("consolidated %s into %s", folder, out)
    return out


if __name__ == "__main__":
    run_cli(main)
