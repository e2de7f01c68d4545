"""run_clm.py end to end on local text: a Llama-layout model trained from scratch, perplexity over fixed blocks."""
from __future__ import annotations

import json
import math

import pytest
import torch

import run_clm
from utils import CliError


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_lines):
    from clm_helpers import train_bpe

    return train_bpe(corpus_lines, tmp_path_factory.mktemp("bpe"))


def _common(out, tok):
    return ["--output_dir", str(out), "--tokenizer_name", str(tok), "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0",
            "--per_device_eval_batch_size", "4", "--logging_steps", "50", "--save_strategy", "no"]


def test_clm_trains_from_scratch_and_perplexity_is_exp_mean_token_loss(tmp_path, bpe_dir, corpus_lines):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("\n".join(corpus_lines[:200]) + "\n")
    valid.write_text("\n".join(corpus_lines[1500:1530]) + "\n")
    overrides = ("num_hidden_layers=2,hidden_size=32,num_attention_heads=4,num_key_value_heads=2,"
                 "intermediate_size=64,max_position_embeddings=64,tie_word_embeddings=true")
    base = ["--model_type", "llama", "--config_overrides", overrides, "--validation_file", str(valid), "--do_eval",
            "--block_size", "32"]
    untrained = run_clm.main(base + _common(tmp_path / "untrained", bpe_dir))
    trained = run_clm.main(base + ["--train_file", str(train), "--do_train", "--max_steps", "30",
                                   "--learning_rate", "1e-2", "--per_device_train_batch_size", "8"]
                           + _common(tmp_path / "teacher", bpe_dir))
    out = tmp_path / "teacher"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]))
    assert trained["perplexity"] < 0.5 * untrained["perplexity"]

    # The reported perplexity is exp(mean next-token loss) over the fixed 32-token blocks of the
    # EOS-terminated documents, recomputed here by hand from the saved model.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
    ids = []
    for line in corpus_lines[1500:1530]:
        if line.strip():
            ids += tok(line)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor([ids[i:i + 32] for i in range(0, len(ids) - 31, 32)])
    assert trained["eval_samples"] == len(blocks)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert trained["eval_loss"] == pytest.approx(loss.item(), rel=1e-4)

    # from the checkpoint: evaluation only, the same number again
    again = run_clm.main(["--model_name_or_path", str(out), "--validation_file", str(valid), "--do_eval",
                          "--block_size", "32"] + _common(tmp_path / "again", bpe_dir))
    assert again["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-6)


def test_clm_bad_inputs(tmp_path, bpe_dir, corpus_lines):
    valid = tmp_path / "valid.txt"
    valid.write_text("one short line\n")
    base = ["--model_type", "llama", "--config_overrides",
            "num_hidden_layers=1,hidden_size=16,num_attention_heads=2,intermediate_size=32,max_position_embeddings=64",
            "--do_eval", "--block_size", "32"]
    with pytest.raises(CliError, match="fewer than --block_size 32 tokens"):
        run_clm.main(base + ["--validation_file", str(valid)] + _common(tmp_path / "a", bpe_dir))
    with pytest.raises(CliError, match="unknown --model_type 'nosuch'"):
        run_clm.main(["--model_type", "nosuch", "--validation_file", str(valid), "--do_eval"]
                     + _common(tmp_path / "b", bpe_dir))
    with pytest.raises(CliError, match="--config_overrides 'n_inner=64'"):
        run_clm.main(["--model_type", "gpt2", "--config_overrides", "n_inner=64", "--validation_file", str(valid),
                      "--do_eval"] + _common(tmp_path / "d", bpe_dir))
    with pytest.raises(CliError, match="not a causal LM"):
        run_clm.main(["--model_type", "t5", "--validation_file", str(valid), "--do_eval"]
                     + _common(tmp_path / "c", bpe_dir))


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(["--help"])
    assert exit_info.value.code == 0
    assert "--block_size" in capsys.readouterr().out
    from transformers import HfArgumentParser

    for action in HfArgumentParser(run_clm.ARGUMENTS)._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), action.option_strings
