"""The BERT quickstart: a masked-LM teacher pretrained from scratch, DistilBERT students of every arm, IIA.

`MlmQuickstart` names the family's scripts (run_mlm.py, scripts/extract_distilbert.py), flags and
settings; the stages themselves are `pipelines.quickstart.pipeline.Quickstart` and
`pipelines.quickstart.distill.DistillQuickstart`.
"""
from __future__ import annotations

import json
from pathlib import Path

from deterministic_wordpiece import train_wordpiece
from pipelines.quickstart.arms import build_arms, init_name, teacher_name
from pipelines.quickstart.distill import DistillQuickstart
from pipelines.quickstart.pipeline import load_fast_tokenizer
from utils import CliError

N_STAGES = 10
EVAL_MASK_SEED = 12345
# The default objective (standard distillation; DIITO adds causal_ce 0.25), chosen from the ablation of the
# `small` preset (docs/quickstart.md): soft targets and the masked-LM loss with uniform masking. The seed's
# recipe (ce + mlm + cos, 0.25 each, --mlm_smoothing 0.7, learning rate 5e-4) stays a reported arm.
DEFAULT_OBJECTIVE = (("ce", 0.25), ("lm", 0.25))
DEFAULT_SMOOTHING = 0.0


def copy_tokenizer(name: str, out_dir: Path) -> None:
    """Save the --tokenizer into `out_dir`; CliError if it cannot serve a masked LM."""
    tok = load_fast_tokenizer(name)
    missing = [t for t in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token") if getattr(tok, t, None) is None]
    if missing:
        raise CliError(f"--tokenizer {name}: lacks {', '.join(missing)}, which a BERT-style masked LM needs")
    tok.save_pretrained(out_dir)


class MlmQuickstart(DistillQuickstart):
    """The BERT quickstart: a masked-LM teacher, DistilBERT students of every arm, IIA."""

    n_stages = N_STAGES
    family = "bert"
    eval_script = "run_mlm.py"
    extract_script = "scripts/extract_distilbert.py"
    student_type = "distilbert"
    lm = "mlm"
    arms = build_arms(mlm=True, default=DEFAULT_OBJECTIVE, default_smoothing=DEFAULT_SMOOTHING)
    default_objective = DEFAULT_OBJECTIVE
    default_smoothing = DEFAULT_SMOOTHING

    def tokenizer_title(self) -> str:
        return f"WordPiece ({self.preset.vocab_size} entries) on the train part"

    def make_tokenizer(self, folder: Path) -> int:
        if self.args.tokenizer:
            copy_tokenizer(self.args.tokenizer, folder)
        else:
            lines = (self.out / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
            train_wordpiece(lines, folder, self.preset.vocab_size)
        saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return len(set(saved["model"]["vocab"]) | {t["content"] for t in saved.get("added_tokens", [])})

    def teacher_command(self, steps: int, seed: int) -> tuple[str, str, list]:
        p = self.preset
        overrides = (f"num_hidden_layers={p.teacher_layers},hidden_size={p.hidden},num_attention_heads={p.heads},"
                     f"intermediate_size={p.ffn},max_position_embeddings={p.max_seq_length}")
        argv = [
            "--model_type", "bert", "--config_overrides", overrides,
            "--tokenizer_name", self.out / "tokenizer", "--train_file", self.out / "corpus" / "train.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length,
            "--do_train", "--max_steps", steps, "--per_device_train_batch_size", p.teacher_batch,
            "--learning_rate", p.teacher_lr, "--warmup_steps", max(1, steps // 16), "--weight_decay", 0.01,
            "--adam_beta2", 0.98, "--train_sampling_strategy", "group_by_length",
            "--logging_steps", max(1, steps // 40), "--save_strategy", "no", "--report_to", "none",
            "--seed", seed, "--dataloader_num_workers", 0, *self.trainer_device_args,
        ]
        title = (f"teacher: BERT {p.teacher_layers} layers x {p.hidden} from scratch, {steps} steps "
                 f"(run_mlm.py --do_train)")
        return title, "run_mlm.py", argv

    def data_stage(self, corpus: dict, tokenizer: dict) -> dict:
        return self.data(corpus, tokenizer, "data: binarize the train part and count its tokens "
                         "(scripts/binarized_data.py, scripts/token_counts.py)", ("token_counts.pickle",))

    def after_binarize(self, folder: Path, data_file: Path) -> None:
        self.pipe.command("token_counts", "scripts/token_counts.py", [
            "--data_file", data_file, "--token_counts_dump", folder / "token_counts.pickle"])

    def extract_flags(self) -> tuple[str, ...]:
        return ("--vocab_transform",)

    def student_config_text(self, record: dict) -> str:
        return json.dumps(record["student_config"], indent=2) + "\n"

    def eval_options(self, split: str = "test") -> tuple[str, list]:
        p = self.preset
        common = [
            "--tokenizer_name", self.out / "tokenizer", "--validation_file", self.out / "corpus" / f"{split}.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length, "--do_eval",
            "--per_device_eval_batch_size", p.eval_batch, "--eval_mask_seed", EVAL_MASK_SEED, "--seed", 0,
            "--report_to", "none", "--dataloader_num_workers", 0,
            *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else []),
        ]
        return f"--eval_mask_seed {EVAL_MASK_SEED}, --max_seq_length {p.max_seq_length}", common

    def student_common(self, data: dict, k: int) -> list:
        p = self.preset
        init = self.out / init_name(k)
        return [
            "--data_file", self.out / "data" / data["data_file"],
            "--token_counts", self.out / "data" / "token_counts.pickle",
            "--student_type", "distilbert", "--student_config", init / "student_config.json",
            "--student_pretrained_weights", init / "student_init.pth",
            "--teacher_type", "bert", "--teacher_name", self.out / teacher_name(k),
            "--tokenizer_name", self.out / "tokenizer", "--mlm",
            "--interchange_prop", 0.3, "--interchange_consecutive_only", "--freeze_pos_embs",
            "--n_epoch", 1000, "--batch_size", p.student_batch, "--gradient_accumulation_steps", 1,
            "--warmup_prop", 0.05, "--group_by_size", "--checkpoint_interval", 0,
            "--save_total_limit", 1, "--num_workers", 0, *self.device_args,
        ]
