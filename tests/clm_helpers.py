"""Builders of tiny Llama-layout causal LMs and a local byte-level BPE tokenizer, for tests (no hub)."""
from __future__ import annotations

import json
from pathlib import Path

# Per family: config overrides that exercise what differs between the rows (GQA, a head_dim that is
# not hidden_size / heads, tied or untied embeddings, sliding-window layers, per-layer RoPE).
FAMILY_OVERRIDES = {
    "llama": dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "mistral": dict(num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False),
    "qwen2": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
                  tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=1, head_dim=12, tie_word_embeddings=True),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "olmo2": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "smollm3": dict(num_key_value_heads=2, no_rope_layer_interval=2, tie_word_embeddings=True),
}


def tiny_causal_config(family: str, n_layers=4, hidden=32, heads=4, vocab=120, **overrides):
    from interventions import FAMILIES

    kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
                  intermediate_size=hidden * 2, max_position_embeddings=128, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(FAMILY_OVERRIDES[family])
    kwargs.update(overrides)
    return FAMILIES[family].config_class(**kwargs)


def tiny_causal(family: str, n_layers=4, seed=0, **overrides):
    """A small `<Family>ForCausalLM` built from a config (eval mode, no dropout), random weights."""
    import torch

    from interventions import FAMILIES

    torch.manual_seed(seed)
    model = FAMILIES[family].model_class(tiny_causal_config(family, n_layers=n_layers, **overrides)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1 (or 0 for Gemma): perturb them so a wrong copy shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def train_bpe(lines, out_dir: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer with <s>, </s> and <pad>, saved as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def llama_distill_setup(tmp_path, corpus_lines, teacher_family="llama", student_family="llama"):
    """A causal_train.py set-up in `tmp_path`: a byte-level BPE tokenizer, a binarized corpus of 300 documents, a
    tiny 4-block teacher, a 2-block student extracted from its blocks 0 and 3, a 2-entry mapping `m.nm`.
    Returns (the corpus file, the tokenizer)."""
    import binarized_data
    import extract

    tok_dir = train_bpe(corpus_lines, tmp_path / "tok")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus_lines[:300]) + "\n", encoding="utf-8")
    data = binarized_data.main(["--file_path", str(text), "--tokenizer_type", teacher_family, "--tokenizer_name",
                                str(tok_dir), "--dump_file", str(tmp_path / "data" / "bin")])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    teacher = tiny_causal(teacher_family, vocab=len(tok), pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    extract.main(["--model_type", teacher_family, "--model_name", str(tmp_path / "teacher"),
                  "--dump_checkpoint", str(tmp_path / "student.pth"), "--layers", "0,3"])
    (tmp_path / "m.nm").write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:4]$[0:8]"], "student_variable_names": ["$L:0$H:[0:4]$[0:8]"]},
        {"teacher_variable_names": ["$L:3$H:1$[0:8]"], "student_variable_names": ["$L:1$H:1$[0:8]"]}]}))
    return data, tok


def llama_train_argv(tmp_path, data, *extra, family="llama"):
    """A causal_train.py command line for a `llama_distill_setup` folder (CPU, 4 steps, DIITO on)."""
    return ["--dump_path", str(tmp_path / "run"), "--data_file", str(data), "--student_type", family,
            "--student_config", str(tmp_path / "student.config.json"),
            "--student_pretrained_weights", str(tmp_path / "student.pth"), "--teacher_type", family,
            "--teacher_name", str(tmp_path / "teacher"), "--alpha_ce", "0.5", "--alpha_clm", "0.5",
            "--alpha_cos", "0.1", "--alpha_causal_ce", "0.5", "--alpha_causal_cos", "0.1",
            "--neuron_mapping", str(tmp_path / "m.nm"), "--n_gpu", "0", "--batch_size", "8",
            "--gradient_accumulation_steps", "1", "--max_steps", "4", "--log_interval", "2", "--num_workers", "0",
            "--learning_rate", "1e-3", "--no_progress", "--seed", "3", *extra]
