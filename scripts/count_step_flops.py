"""FLOPs of one causal_train.py training step, counted on the run's own first batches.

Builds exactly what `causal_train.py` builds for the given command line (models, data, masking,
mapping, distiller), then runs its first --batches micro-steps under torch's FlopCounterMode
(every matmul of the forward and backward passes, the vocabulary-wide losses included) and writes
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from utils import CliError, atomic_write_text, logger, run_cli  # noqa: E402


def count(train_argv: list[str], n_batches: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    import causal_train as ct
    from bench_train_step import _count_cpu_flash_attention
    from binarized_io import load_corpus
    from causal_distiller import CausalDistiller
    from interventions import model_shape
    from lm_seqs_dataset import LmSeqsDataset
    from neuron_mapping import load_neuron_mapping
    from utils import init_gpu_params, set_seed

    _count_cpu_flash_attention()
    with tempfile.TemporaryDirectory() as tmp:
        args = ct.build_parser().parse_args([*train_argv, "--dump_path", str(Path(tmp) / "run"), "--force"])
        ct.sanity_checks(args)
        init_gpu_params(args)
        set_seed(args.seed)
        args.special_tok_ids = ct.load_special_tokens(args)
        teacher = ct.load_teacher(args)
        student = ct.build_student(args)
        ct.model_checks(args, student, teacher)
        if args.max_model_input_size is None:
            args.max_model_input_size = min(ct.max_positions(teacher), ct.max_positions(student))
        mappings = None
        if args.neuron_mapping:
            mappings = load_neuron_mapping(args.neuron_mapping, model_shape(teacher), model_shape(student))
        token_probs = ct.load_token_probs(args, student.config.vocab_size, args.special_tok_ids) if args.mlm else None
        ids = args.special_tok_ids
        dataset = LmSeqsDataset(data=load_corpus(args.data_file), max_model_input_size=args.max_model_input_size,
                                cls_id=ids["cls_token"], sep_id=ids["sep_token"], pad_id=ids["pad_token"],
                                unk_id=ids["unk_token"], seed=args.seed,
                                paired=args.alpha_causal_ce > 0 or args.alpha_causal_cos > 0)
        student.to(args.device)
        teacher.to(args.device).eval()
        for p in teacher.parameters():
            p.requires_grad = False
        Path(args.dump_path).mkdir(parents=True)
        distiller = CausalDistiller(args, dataset, token_probs, student, teacher, mappings)
        student.train()
        batches = distiller._epoch_batches(0)[:n_batches]
        flops, tokens = [], 0
        for batch in distiller._loader(batches):
            with FlopCounterMode(display=False) as counter:
                losses = distiller._micro_step(batch, sync=True)
            distiller._optimizer_step(losses)
            flops.append(counter.get_total_flops())
            tokens += int(batch["base_lengths"].sum())
        if distiller.tb is not None:
            distiller.tb.close()
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
