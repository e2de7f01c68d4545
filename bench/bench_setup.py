"""The benchmarks' shared set-up: model and batch presets, the modes measured, synthetic (or --data_file)
sequences, the in-memory models, and causal_train.py's arguments for a (mode, precision). bench_train_step.py
measures one process with it; bench_sharded.py one rank of a torchrun child."""
from __future__ import annotations

PRESETS = {
    # The reference configuration: teacher 6 x 256, student 3 x 256, vocabulary 30,522, batch 16.
    "tiny": dict(t_layers=6, s_layers=3, hidden=256, heads=4, ffn=1024, vocab=30522, batch=16, max_len=512,
                 t_site=3, s_site=1),
    # BERT-base teacher -> 6-layer DistilBERT student, batch 40, lengths up to 512.
    "base": dict(t_layers=12, s_layers=6, hidden=768, heads=12, ffn=3072, vocab=30522, batch=40, max_len=512,
                 t_site=6, s_site=3),
    # Causal LMs: a Llama teacher 6 x 256 (4 query heads, 2 key/value heads) -> a 3-block Llama
    # student, Llama-2's vocabulary of 32,000, batch 16; losses ce + clm (no masking).
    "tiny_clm": dict(t_layers=6, s_layers=3, hidden=256, heads=4, kv_heads=2, ffn=1024, vocab=32000, batch=16,
                     max_len=512, t_site=3, s_site=1, family="llama"),
    # A realistic causal-LM size for a GPU: a Llama teacher of 16 x 1024 (16 query heads, 8 key/value
    # heads, MLP 4096) with Llama 3's vocabulary of 128,256 (about 514M parameters, half of them the
    # embeddings and the untied head) -> an 8-block student (about 388M); batch 16.
    # A larger Llama shape for the DDP/FSDP memory comparison on a CPU (--fsdp): teacher 8 x 768 (12 query heads, 4
    # key/value heads, MLP 2048; about 100M parameters, half of them the embeddings and the untied head) -> a 4-block
    # student (about 74M: 1.2 GB of fp32 weights, gradients and AdamW state); batch 4.
    "mid_clm": dict(t_layers=8, s_layers=4, hidden=768, heads=12, kv_heads=4, ffn=2048, vocab=32000, batch=4,
                    max_len=256, t_site=4, s_site=2, family="llama"),
    "base_clm": dict(t_layers=16, s_layers=8, hidden=1024, heads=16, kv_heads=8, ffn=4096, vocab=128256, batch=16,
                     max_len=512, t_site=8, s_site=4, family="llama"),
}
# Special ids of the synthetic data: BERT's [CLS] [SEP] [PAD] [UNK] [MASK]; Llama's <s> </s> (pad 0).
SPECIAL_IDS = {
    "bert": {"mask_token": 103, "pad_token": 0, "cls_token": 101, "sep_token": 102, "unk_token": 100},
    "llama": {"pad_token": 0, "cls_token": 1, "sep_token": 2, "unk_token": 0},
}
MODES = {
    "kd": dict(alpha_causal_ce=0.0, no_shared_prefix=False),
    "diito_plain": dict(alpha_causal_ce=0.25, no_shared_prefix=True),
    "diito_shared": dict(alpha_causal_ce=0.25, no_shared_prefix=False),
    # causal LMs: standard distillation on the student's own samples for every batch (--on_policy_fraction 1,
    # 16 prompt tokens, 32 sampled): the cost of sampling, against `kd`
    "kd_on_policy": dict(alpha_causal_ce=0.0, no_shared_prefix=False, on_policy=1.0),
}


def preset_of(args) -> dict:
    """The sizes of `args.preset`, with `args.batch_size` in place of its batch when given."""
    return {**PRESETS[args.preset], **({"batch": args.batch_size} if args.batch_size else {})}


def synthetic_sequences(n: int, vocab: int, seed: int, first: int = 101, last: int = 102,
                         length: int | None = None):
    """Lengths like the WikiText fixture (log-normal, mean about 62, 12..466 tokens), or all `length` long."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.8, sigma=0.8, size=n).astype(int), 12, 466)
    if length is not None:
        lengths = np.full(n, length)
    dtype = np.uint16 if vocab <= 2**16 else np.int32
    seqs = []
    for length in lengths:
        body = rng.integers(1000, vocab, size=length - 2)
        seqs.append(np.concatenate([[first], body, [last]]).astype(dtype))
    return seqs


def build_models(cfg, seed=0):
    import torch
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    if cfg.get("family") == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        common = dict(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                      num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["ffn"],
                      max_position_embeddings=cfg["max_len"], tie_word_embeddings=False)
        return (LlamaForCausalLM(LlamaConfig(num_hidden_layers=cfg["t_layers"], **common)),
                LlamaForCausalLM(LlamaConfig(num_hidden_layers=cfg["s_layers"], **common)))
    teacher = BertForMaskedLM(BertConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["t_layers"],
        num_attention_heads=cfg["heads"], intermediate_size=cfg["ffn"], max_position_embeddings=512,
    ))
    student = DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=cfg["vocab"], dim=cfg["hidden"], n_layers=cfg["s_layers"], n_heads=cfg["heads"],
        hidden_dim=cfg["ffn"], max_position_embeddings=512, sinusoidal_pos_embds=False,
    ))
    return teacher, student


def build_dataset(args, cfg: dict, ids: dict):
    """The paired dataset of --data_file, or of synthetic sequences with WikiText-like lengths (or all --seq_len long)."""
    import numpy as np

    from lm_seqs_dataset import LmSeqsDataset

    length = min(args.seq_len, cfg["max_len"]) if args.seq_len else None
    data = synthetic_sequences(2000, cfg["vocab"], 0, ids["cls_token"], ids["sep_token"], length)
    if args.data_file:
        from binarized_io import load_corpus

        corpus = load_corpus(args.data_file)
        data = [np.asarray(corpus[i]) for i in range(len(corpus))]
    dataset = LmSeqsDataset(data=data, max_model_input_size=cfg["max_len"], cls_id=ids["cls_token"],
                            sep_id=ids["sep_token"], pad_id=ids["pad_token"], unk_id=ids["unk_token"], seed=0,
                            paired=True)
    return dataset


def train_args(args, cfg: dict, mlm: bool):
    """causal_train.py's arguments for a (mode, precision) of the benchmark: one step per batch, no warm-up.

    The models and data are made in memory (`build_from_models`): the paths given are not read."""
    from distill_setup import build_parser

    mode = MODES[args.mode]
    argv = ["--dump_path", args.tmp, "--data_file", args.data_file or "synthetic", "--teacher_name", "in-memory",
            "--student_config", "in-memory", "--teacher_type", "bert" if mlm else cfg["family"],
            "--student_type", "distilbert" if mlm else cfg["family"],
            "--alpha_ce", "0.5", "--alpha_mlm", "0.5" if mlm else "0.0", "--alpha_clm", "0.0" if mlm else "0.5",
            "--alpha_causal_ce", str(mode["alpha_causal_ce"]), "--gradient_accumulation_steps", "1",
            "--n_epoch", "1", "--seed", "0", "--batch_size", str(cfg["batch"]),
            "--max_model_input_size", str(cfg["max_len"]), "--learning_rate", "1e-4", "--warmup_prop", "0.0",
            "--num_workers", "0", "--log_interval", str(10**9), "--checkpoint_interval", "0", "--no_progress"]
    argv += ["--mlm"] * mlm + ["--compile"] * bool(args.compile)
    argv += {"bf16": ["--bf16"], "fp16": ["--fp16"]}.get(args.dtype, [])
    argv += ["--no_shared_prefix"] * mode["no_shared_prefix"]
    if mode.get("on_policy"):
        argv += ["--on_policy_fraction", str(mode["on_policy"])]
    if args.pad_to_multiple_of is not None:
        argv += ["--pad_to_multiple_of", str(args.pad_to_multiple_of)]
    return build_parser().parse_args(argv)
