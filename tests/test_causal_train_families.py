"""GPT-2 (causal LM) and RoBERTa students distil through the same trainer."""
import json
import pickle

import numpy as np
import pytest
import torch

import causal_train


def _bpe_tokenizer(lines, out_dir, kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "gpt2":
        fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>")
    else:
        fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                    cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(out_dir)
    return fast


def _corpus(tok, lines, path, first, last):
    from binarized_io import CorpusWriter

    counts = np.zeros(len(tok), dtype=np.int64)
    with CorpusWriter(path, fmt="mmap", vocab_size=len(tok), tokenizer_name="bpe", seed=0) as writer:
        for ids in tok(list(lines), add_special_tokens=False)["input_ids"]:
            arr = np.asarray([first] + ids[:60] + [last], dtype=np.int64)
            writer.add(arr)
            np.add.at(counts, arr, 1)
    return counts


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_family_distils_with_diito(kind, tmp_path, corpus_lines, caplog):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GPT2Config, GPT2LMHeadModel, \
        RobertaConfig, RobertaForMaskedLM

    tok = _bpe_tokenizer(corpus_lines, tmp_path / "tok", kind)
    vocab = len(tok)
    torch.manual_seed(0)
    if kind == "gpt2":
        first = last = tok.eos_token_id
        t_cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=128)
        s_cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        teacher, lm_flags = GPT2LMHeadModel(t_cfg), ["--alpha_clm", "0.5"]
    else:
        first, last = tok.cls_token_id, tok.sep_token_id
        common = dict(vocab_size=vocab, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=130, pad_token_id=tok.pad_token_id, type_vocab_size=1)
        t_cfg, s_cfg = RobertaConfig(num_hidden_layers=4, **common), RobertaConfig(num_hidden_layers=2, **common)
        teacher, lm_flags = RobertaForMaskedLM(t_cfg), ["--mlm", "--alpha_mlm", "0.5", "--alpha_clm", "0.0"]
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    s_cfg.to_json_file(tmp_path / "student.json")
    counts = _corpus(tok, corpus_lines[:300], tmp_path / "data.bin", first, last)
    with open(tmp_path / "counts.pickle", "wb") as fh:
        pickle.dump(counts.tolist(), fh)
    (tmp_path / "m.nm").write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:2$H:[0:4]$[0:8]"], "student_variable_names": ["$L:1$H:[0:4]$[0:8]"]}]}))
    dump = tmp_path / "run"
    caplog.set_level("INFO")
    causal_train.main([
        "--dump_path", str(dump), "--data_file", str(tmp_path / "data.bin"), "--token_counts",
        str(tmp_path / "counts.pickle"), "--student_type", kind, "--student_config", str(tmp_path / "student.json"),
        "--teacher_type", kind, "--teacher_name", str(tmp_path / "teacher"), "--alpha_ce", "0.5",
        "--alpha_cos", "0.1", "--alpha_causal_ce", "0.5", "--neuron_mapping", str(tmp_path / "m.nm"),
        "--n_gpu", "0", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--max_steps", "4",
        "--log_interval", "2", "--num_workers", "0", "--no_progress", *lm_flags,
    ])
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 4 |")]
    assert steps, caplog.text[-2000:]
    assert (" clm " if kind == "gpt2" else " mlm ") in steps[0] and " causal_ce " in steps[0]
    auto = AutoModelForCausalLM if kind == "gpt2" else AutoModelForMaskedLM
    model = auto.from_pretrained(dump)
    assert model.config.num_hidden_layers == 2
