"""Benchmark of scripts/binarized_data.py against the bare fast tokenizer, on the same text.

Not a test: it prints figures. Times the whole script (reading the text file, tokenising in
batches, adding the special tokens, writing the memory-mapped .bin) and, in the same run, the
bare `tokenizer(batch, add_special_tokens=False)` over the same lines and batch size, then prints
the script's throughput as a share of the bare tokenizer's (target: at least 90%).

    python bench/bench_binarize.py --tokenizer_name ../shared/fixtures/bert-base-uncased-tokenizer
    python bench/bench_binarize.py --tokenizer_name tokenizers/bert-base-uncased --file_path my_corpus.txt
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_name", required=True, help="A local tokenizer folder (or a hub name).")
    parser.add_argument("--file_path", default=None,
                        help="Text file, one example per line (default: the stdlib prose corpus, repeated).")
    parser.add_argument("--repeat", type=int, default=10, help="Times the default corpus is repeated.")
    parser.add_argument("--batch_size", type=int, default=1000, help="Examples per tokenizer call.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds; the best of each is kept.")
    args = parser.parse_args()

    from types import SimpleNamespace

    import binarize
    from binarized_io import dtype_for_vocab, output_path
    from doc_corpus import stdlib_documents

    tmp = Path(tempfile.mkdtemp())
    if args.file_path:
        text_file = Path(args.file_path)
    else:
        text_file = tmp / "corpus.txt"
        text_file.write_text("\n".join(stdlib_documents() * args.repeat) + "\n", encoding="utf-8")
    lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    tokenizer, bos_id, eos_id = binarize.load_tokenizer_and_wrap_ids(args.tokenizer_name, "bert")

    def bare():
        n = 0
        for i in range(0, len(lines), args.batch_size):
            n += sum(map(len, tokenizer(lines[i:i + args.batch_size], add_special_tokens=False)["input_ids"]))
        return n

    def script():  # what scripts/binarized_data.py does after its checks, in one process
        sources = binarize.load_sources(SimpleNamespace(file_path=str(text_file), dataset_name=None, split="train",
                                                        cache_dir=None, field_name="text"))
        binarize.write_corpus(output_path(tmp / "out", "train", args.tokenizer_name, "mmap"), "mmap", sources,
                              "text", args.batch_size, -1, tokenizer, args.tokenizer_name, bos_id, eos_id,
                              dtype_for_vocab(len(tokenizer)), 1, 0, str(text_file))

    bare()  # warm-up
    t_bare = min(_timed(bare) for _ in range(args.rounds))
    t_script = min(_timed(script) for _ in range(args.rounds))
    n_tokens = bare()
    print(f"\n## bench_binarize ({len(lines)} lines, {n_tokens} tokens, batch {args.batch_size}; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')})\n")
    print("| what | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| bare tokenizer(batch) | {t_bare:.2f} | {n_tokens / t_bare:,.0f} |")
    print(f"| scripts/binarized_data.py (read, tokenise, wrap, write .bin) | {t_script:.2f} | "
          f"{n_tokens / t_script:,.0f} |")
    print(f"\nscript throughput = {t_bare / t_script:.0%} of the bare tokenizer's")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
