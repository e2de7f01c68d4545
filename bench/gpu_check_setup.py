"""Build a local distillation set-up for `bench/gpu_check.sh`, through the pipeline's own scripts.

    python bench/gpu_check_setup.py --out W --shape tiny|base [--tokenizer DIR]

Standard-library prose (`scripts/stdlib_corpus.py`) is binarized with the tokenizer
(`scripts/binarized_data.py`), counted (`scripts/token_counts.py`); a BERT teacher of the shape
is built from a config (random weights: no hub), a DistilBERT student extracted from it
(`scripts/extract_distilbert.py --vocab_transform`) and a neuron mapping written
(`scripts/make_mapping.py --alignment single_middle`). Prints the paths as shell assignments.

Shapes: tiny, a 6 x 256 teacher and a 3-block student (the bench's tiny preset); base, BERT-base
(12 x 768, 12 heads, MLP 3072) and a 6-block student (blocks 0,2,4,7,9,11). The tokenizer is
--tokenizer (e.g. the bert-base-uncased vocabulary), or a WordPiece learned from the corpus.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "tiny": dict(layers=6, hidden=256, heads=4, ffn=1024, student_layers=3),
    "base": dict(layers=12, hidden=768, heads=12, ffn=3072, student_layers=6),
}


def run(script: str, *args: str) -> None:
    """One of the pipeline's scripts, as a user runs it (its own process)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder to build in (created; reused if complete).")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="Teacher and student sizes.")
    parser.add_argument("--tokenizer", default=None,
                        help="A local BERT tokenizer folder (default: learn a WordPiece of 8,000 from the corpus).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    if not corpus.exists():
        run("stdlib_corpus.py", "--out", str(corpus))
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if not args.tokenizer and not (tok_dir / "tokenizer.json").exists():
        from deterministic_wordpiece import train_wordpiece

        train_wordpiece(corpus.read_text(encoding="utf-8").splitlines(), tok_dir, vocab_size=8000)
    data = out / f"data.train.{tok_dir.name}.bin"
    if not data.exists():
        run("binarized_data.py", "--file_path", str(corpus), "--tokenizer_type", "bert", "--tokenizer_name",
            str(tok_dir), "--dump_file", str(out / "data"))
    counts = out / "counts.pickle"
    if not counts.exists():
        run("token_counts.py", "--data_file", str(data), "--token_counts_dump", str(counts))

    shape = SHAPES[args.shape]
    teacher = out / f"teacher_{args.shape}"
    if not (teacher / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=shape["hidden"],
                                           num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                           intermediate_size=shape["ffn"], max_position_embeddings=512))
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
    student = out / f"student_{args.shape}"
    if not (student / "model.safetensors").exists():
        run("extract_distilbert.py", "--model_type", "bert", "--model_name", str(teacher), "--dump_checkpoint",
            str(student), "--num_layers", str(shape["student_layers"]), "--vocab_transform")
    mapping = out / f"single_middle_{args.shape}.nm"
    if not mapping.exists():
        run("make_mapping.py", "--teacher", str(teacher), "--student", str(student), "--alignment", "single_middle",
            "--output", str(mapping))
    for name, path in (("DATA", data), ("COUNTS", counts), ("TEACHER", teacher), ("STUDENT", student),
                       ("MAPPING", mapping)):
        print(f"{name}={shlex.quote(str(path))}")


if __name__ == "__main__":
    main()
