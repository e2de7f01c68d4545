"""Issue 21.5: the Trainer checkpoints of the run_* scripts. A checkpoint whose optimizer, schedule, RNG state or
weights are missing, truncated, corrupt or crafted is named and skipped for the newest complete one (it was a
traceback, or a silent resume into a different run), and a resume from an intact one ends bitwise where the
uninterrupted run ends (run_glue.py: collation draws nothing at random; run_mlm.py's random masking does not
resume exactly, see docs/reliability.md)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import Payload, assert_same_weights, glue_args, student_weights

import finetune_common
import run_glue
from utils import CliError


@pytest.fixture(scope="module")
def glue_model(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=16,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("glue_model")
    BertForMaskedLM(config).save_pretrained(path)
    return path


def _argv(model, tokenizer_dir, data, out, cache) -> list[str]:
    return ["--model_name_or_path", str(model), "--tokenizer_name", str(tokenizer_dir), "--do_train", "--task_name",
            "sst2", "--train_file", str(data), "--output_dir", str(out), "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-3", "--save_steps", "2", "--max_steps", "4", "--cache_dir", str(cache)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, glue_model, tokenizer_dir):
    """A finished 4-step run_glue.py run with checkpoint-2 and checkpoint-4 (dropout on: the RNG matters)."""
    root = tmp_path_factory.mktemp("trainer")
    rows = ["sentence,label"] + [f"{w} film,{i % 2}" for i, w in enumerate(["good", "bad", "great", "dull"] * 6)]
    data = root / "sst2.csv"
    data.write_text("\n".join(rows) + "\n")
    out = root / "run"
    argv = _argv(glue_model, tokenizer_dir, data, out, root / "cache")
    run_glue.main(argv)
    assert (out / "checkpoint-2" / "optimizer.pt").is_file() and (out / "checkpoint-4" / "rng_state.pth").is_file()
    return out, argv



def _damage(folder: Path, name: str, kind: str, marker: Path) -> None:
    path = folder / name
    if kind == "deleted":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "bitflip":  # inside the zip's first member: its CRC no longer matches
        data = bytearray(path.read_bytes())
        data[200] ^= 0x01
        path.write_bytes(bytes(data))
    elif kind == "crafted":
        torch.save({"python": Payload(marker)}, path)


DAMAGE = [
    ("optimizer.pt", "truncated", "optimizer.pt is truncated or corrupt"),
    ("optimizer.pt", "bitflip", "optimizer.pt is corrupt"),
    ("optimizer.pt", "deleted", "no optimizer.pt: a resume would silently restart the optimiser's state"),
    ("scheduler.pt", "deleted", "no scheduler.pt"),
    ("rng_state.pth", "truncated", "rng_state.pth is truncated or corrupt"),
    ("rng_state.pth", "deleted", "no rng_state.pth: a resume would silently restart the random generators"),
    ("rng_state.pth", "crafted", "rng_state.pth holds posix.system, which weights-only loading refuses"),
    ("model.safetensors", "truncated", "model.safetensors is truncated or corrupt"),
]


@pytest.mark.parametrize("name, kind, message", DAMAGE, ids=[f"{n}-{k}" for n, k, _ in DAMAGE])
def test_a_damaged_trainer_checkpoint_is_named_and_skipped_and_the_resume_is_exact(finished, tmp_path, caplog, name,
                                                                                   kind, message):
    source, argv = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    argv = [str(out) if a == str(source) else a for a in argv]
    marker = tmp_path / "pwned"
    _damage(out / "checkpoint-4", name, kind, marker)
    assert message in finetune_common.trainer_checkpoint_problem(out / "checkpoint-4")
    with pytest.raises(CliError, match=f"checkpoint-4: not a complete Trainer checkpoint \\({message}"):
        run_glue.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    (out / "train_results.json").unlink()  # as a run killed after checkpoint-4 leaves it
    caplog.set_level(logging.WARNING)
    run_glue.main(argv)
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}: {message}" in caplog.text
    assert f"RESUMING training from {out / 'checkpoint-2'} (step 2)" in caplog.text
    assert_same_weights(student_weights(out), student_weights(source))  # steps 3 and 4 redone, bitwise
    assert not marker.exists()


def test_an_evaluation_failing_after_training_loses_nothing(tmp_path, glue_model, tokenizer_dir, monkeypatch):
    """Issue 21.4: run_qa.py stopped with a traceback after training when an answer could not be scored, wrote no
    eval_results.json and refused a rerun: the training was lost. Such answers are now refused before training; any
    evaluation that still fails after it says the model is saved and how to evaluate it without training again."""
    import json

    import run_qa

    context = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    rows = [{"id": f"q{i}", "title": "t", "context": context, "question": q,
             "answers": {"text": [a], "answer_start": [context.index(a)]}}
            for i, (q, a) in enumerate([("What jumps?", "brown fox"), ("Over what?", "the lazy dog"),
                                        ("Near what?", "river bank"), ("When?", "dawn")])]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"data": rows}))
    out = tmp_path / "qa"
    common = ["--tokenizer_name", str(tokenizer_dir), "--validation_file", str(data), "--max_seq_length", "48",
              "--doc_stride", "16", "--output_dir", str(out), "--use_cpu", "--report_to", "none", "--disable_tqdm",
              "true", "--cache_dir", str(tmp_path / "cache")]

    def unscorable(predictions, references):
        raise ValueError("question 'q0' has no gold answer")

    monkeypatch.setattr(run_qa, "squad_evaluate", unscorable)
    with pytest.raises(CliError) as err:
        run_qa.main(["--model_name_or_path", str(glue_model), "--train_file", str(data), "--do_train", "--do_eval",
                     "--max_steps", "2", "--per_device_train_batch_size", "2", *common])
    assert (f"the training finished and its model is saved in {out}, but the evaluation failed: ValueError: question "
            f"'q0' has no gold answer. Nothing is lost: evaluate it with --model_name_or_path {out} --do_eval "
            f"(without --do_train)") in str(err.value)
    assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()
    monkeypatch.undo()
    run_qa.main(["--model_name_or_path", str(out), "--do_eval", *common])  # as the message says
    assert json.loads((out / "eval_results.json").read_text())["eval_samples"] == 4


def test_trainer_resume_skips_incomplete_and_refuses_finished(tmp_path, glue_model, tokenizer_dir, caplog):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(glue_model), "--tokenizer_name", str(tokenizer_dir), "--do_train"] + glue_args(out, tmp_path)
    run_glue.main(argv)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    with pytest.raises(CliError, match="finished training run .*--overwrite_output_dir"):
        run_glue.main(argv)

    # A run killed while saving checkpoint-4: no trainer_state.json there, no train_results.json.
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "train_results.json").unlink()
    caplog.set_level(logging.WARNING)
    run_glue.main(argv)
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert f"RESUMING training from {out / 'checkpoint-2'} (step 2)" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()

    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # truncated
    with pytest.raises(CliError, match="checkpoint-4: not a complete Trainer checkpoint .*truncated"):
        run_glue.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    caplog.clear()
    run_glue.main(argv + ["--resume_from_checkpoint", "latest"])
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}: trainer_state.json is truncated" in caplog.text
    assert f"RESUMING training from {out / 'checkpoint-2'}" in caplog.text
    caplog.clear()
    run_glue.main(argv + ["--resume_from_checkpoint", "latest"])  # checkpoint-4 is complete again: at the end
    assert f"{out / 'checkpoint-4'} already reached step 4 of 4: no training step is left" in caplog.text
    caplog.clear()
    run_glue.main(argv + ["--overwrite_output_dir"])
    assert "RESUMING" not in caplog.text and json.loads((out / "train_results.json").read_text())["train_loss"] > 0
