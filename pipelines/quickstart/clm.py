"""The causal-LM quickstart: `scripts/quickstart.py --family llama` (or `--family gpt2`).

The same offline pipeline, stages and report as the BERT quickstart (pipelines/quickstart/distill.py:
references, ablation, the main arms at equal steps and equal compute, IIA, a two-sided verdict),
with a decoder-only teacher:

  2 tokenizer   a byte-level BPE tokenizer with <s>, </s> and <pad>, trained on the train part
  3 teacher     a small Llama (grouped-query attention, rotary positions, RMSNorm) or GPT-2 trained
                from scratch: run_clm.py --do_train
  4 data        scripts/binarized_data.py --tokenizer_type llama|gpt2 (BOS text EOS; no token counts)
  5 references  scripts/extract.py --model_type llama|gpt2, the student config (the teacher's at the
                student's depth), a DIITO neuron mapping, the student at initialisation and a random one
  6 ablation    each loss term alone (ce, clm, cos, causal_ce), the seed's combination, the default at
                the seed's rate, the seed's recipe with DIITO's term
  7 students    standard distillation (ce + clm), DIITO (+ causal_ce), standard at DIITO's compute and
                the seed's recipe (ce + clm + cos); run_clm.py --do_eval over fixed EOS-separated blocks
  8 alignment   run_iia.py: IIA at every position that has a next token
  9 report      <out>/report.md with the tables, the verdict and plots
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from extraction import student_config
from pipelines.quickstart.arms import NAMES, build_arms, init_name, teacher_name
from pipelines.quickstart.distill import DistillQuickstart
from pipelines.quickstart.pipeline import PRESETS, Preset, load_fast_tokenizer
from utils import CliError

CLM_FAMILIES = ("llama", "gpt2")
SPECIALS = ["<pad>", "<s>", "</s>"]
N_STAGES = 10
# The default objective (standard distillation; DIITO adds causal_ce 0.25), chosen from the ablation of the
# `small` preset (docs/quickstart.md). The seed's recipe (ce + clm + cos, 0.25 each, learning rate 5e-4) stays a
# reported arm.
DEFAULT_OBJECTIVE = (("ce", 0.25), ("lm", 0.25))


# Teacher steps of a causal-LM teacher per preset. run_clm.py packs every 32-sequence batch into full 128-token
# blocks, several times the tokens of a masked-LM batch of short paragraphs: a 4-block Llama teacher runs at about
# 1.3 steps a second on one of 2 idle cores, so 1200 steps take 15 min, about 7 passes over the corpus (the curve is
# in docs/quickstart.md). `study` trains its five teachers for 600 steps, two at a time (three rounds of about 8
# min), so that the family's study fits its 100 min; they still leave the initialisations far behind.
TEACHER_STEPS = {"small": 1200, "gpu": 300, "test": PRESETS["test"].teacher_steps, "study": 600}
# Fine-tuning steps on the downstream tasks, fewer than the BERT presets': a causal-LM fine-tune step costs about
# twice a BERT one here. At `study`'s 100 steps its 112 fine-tunes took about 40 min (33 of a random student's 41 s
# were training); at 40 steps a teacher still reached 53.8% on `replaced` against the random student's 52.2% (one
# seed each), and the stage took 17 min.
DOWNSTREAM_STEPS = {"small": 40, "study": 40}
# Test pairs of the alignment stage. `study` measures IIA for about 200 (model, mapping) pairs; at 256 pairs a
# 4-block Llama teacher and its student took 12 s of compute each (30 min of the study's 126); 128 halves that. The
# verdicts pair arms on the same pairs, and the spread between teachers is several times the pairs' own.
IIA_PAIRS = {"study": 128}


def preset_for(name: str) -> Preset:
    """The BERT quickstart's preset of that name, with the causal-LM teacher's step count (`TEACHER_STEPS`),
    fine-tuning steps (`DOWNSTREAM_STEPS`) and IIA pairs (`IIA_PAIRS`)."""
    bert = PRESETS[name]
    return replace(bert, teacher_steps=TEACHER_STEPS[name],
                   downstream_steps=DOWNSTREAM_STEPS.get(name, bert.downstream_steps),
                   iia_pairs=IIA_PAIRS.get(name, bert.iia_pairs))


def config_overrides(family: str, p: Preset) -> str:
    """run_clm.py --config_overrides for the teacher of `family` at preset `p`."""
    if family == "gpt2":  # (GPT-2's FFN is 4 x the width)
        return f"n_layer={p.teacher_layers},n_embd={p.hidden},n_head={p.heads},n_positions={p.max_seq_length}"
    kv_heads = p.heads // 2 if p.heads % 2 == 0 else p.heads  # grouped-query attention: 2 queries per key/value
    return (f"num_hidden_layers={p.teacher_layers},hidden_size={p.hidden},num_attention_heads={p.heads},"
            f"num_key_value_heads={kv_heads},intermediate_size={p.ffn},max_position_embeddings={p.max_seq_length},"
            f"tie_word_embeddings=false")


def train_bpe(lines: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer (<pad>, <s>, </s>) trained on `lines`, saved as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out_dir)
    return out_dir


def copy_tokenizer(name: str, out_dir: Path) -> None:
    """Save the --tokenizer into `out_dir`; CliError unless it has an EOS."""
    tok = load_fast_tokenizer(name)
    if tok.eos_token is None:
        raise CliError(f"--tokenizer {name}: has no EOS token, which a causal LM's documents need")
    tok.save_pretrained(out_dir)


class ClmQuickstart(DistillQuickstart):
    """The pipeline's corpus and bookkeeping, with a causal-LM teacher, students and evaluation."""

    n_stages = N_STAGES
    eval_script = "run_clm.py"
    extract_script = "scripts/extract.py"
    lm = "clm"
    arms = build_arms(mlm=False, default=DEFAULT_OBJECTIVE, default_smoothing=None)
    default_objective = DEFAULT_OBJECTIVE
    default_smoothing = None

    def __init__(self, args, preset, user_docs):
        super().__init__(args, preset, user_docs)
        self.family = self.student_type = args.family

    def family_settings(self) -> dict:
        return {"family": self.family}

    def tokenizer_title(self) -> str:
        return f"byte-level BPE ({self.preset.vocab_size} entries) on the train part"

    def tokenizer_settings(self) -> dict:
        return {"kind": "bpe"}

    def make_tokenizer(self, folder: Path) -> int:
        from transformers import AutoTokenizer

        if self.args.tokenizer:
            copy_tokenizer(self.args.tokenizer, folder)
        else:
            lines = (self.out / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
            train_bpe(lines, folder, self.preset.vocab_size)
        return len(AutoTokenizer.from_pretrained(folder))

    def teacher_command(self, steps: int, seed: int) -> tuple[str, str, list]:
        p = self.preset
        argv = [
            "--model_type", self.family, "--config_overrides", config_overrides(self.family, p),
            "--tokenizer_name", self.out / "tokenizer", "--train_file", self.out / "corpus" / "train.txt",
            "--block_size", p.max_seq_length,
            "--do_train", "--max_steps", steps, "--per_device_train_batch_size", p.teacher_batch,
            "--learning_rate", p.teacher_lr, "--warmup_steps", max(1, steps // 16), "--weight_decay", 0.01,
            "--adam_beta2", 0.98, "--logging_steps", max(1, steps // 40), "--save_strategy", "no",
            "--report_to", "none", "--seed", seed, "--dataloader_num_workers", 0,
            *self.trainer_device_args,
        ]
        title = (f"teacher: {NAMES[self.family]} {p.teacher_layers} layers x {p.hidden} from scratch, "
                 f"{steps} steps (run_clm.py --do_train)")
        return title, "run_clm.py", argv

    def data_stage(self, corpus: dict, tokenizer: dict) -> dict:
        return self.data(corpus, tokenizer, f"data: binarize the train part "
                         f"(scripts/binarized_data.py --tokenizer_type {self.family})")

    def extract_title_flags(self) -> tuple[str, ...]:
        return ("--model_type", self.family)

    def student_config_text(self, record: dict) -> str:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.out / teacher_name(1))
        return student_config(config, record["teacher_layers"]).to_json_string()

    def eval_options(self, split: str = "test") -> tuple[str, list]:
        p = self.preset
        common = [
            "--tokenizer_name", self.out / "tokenizer", "--validation_file", self.out / "corpus" / f"{split}.txt",
            "--block_size", p.max_seq_length, "--do_eval", "--per_device_eval_batch_size", p.eval_batch,
            "--seed", 0, "--report_to", "none", "--dataloader_num_workers", 0,
            *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else []),
        ]
        return f"--block_size {p.max_seq_length}", common

    def student_common(self, data: dict, k: int) -> list:
        p = self.preset
        init = self.out / init_name(k)
        return [
            "--data_file", self.out / "data" / data["data_file"],
            "--student_type", self.family, "--student_config", init / "student_config.json",
            "--student_pretrained_weights", init / "student_init.pth",
            "--teacher_type", self.family, "--teacher_name", self.out / teacher_name(k),
            "--tokenizer_name", self.out / "tokenizer",
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            "--n_epoch", 1000, "--batch_size", p.student_batch, "--max_model_input_size", p.max_seq_length,
            "--gradient_accumulation_steps", 1, "--warmup_prop", 0.05,
            "--group_by_size", "--checkpoint_interval", 0,
            "--save_total_limit", 1, "--num_workers", 0, *self.device_args,
        ]


def checked_preset(name: str, family: str) -> Preset:
    """The preset for `family`; CliError if its sizes do not fit the family."""
    if family not in CLM_FAMILIES:
        raise CliError(f"--family {family}: the causal-LM quickstart knows {', '.join(CLM_FAMILIES)}")
    preset = preset_for(name)
    if preset.hidden % preset.heads:
        raise CliError(f"preset {name}: hidden size {preset.hidden} is not a multiple of {preset.heads} heads")
    return replace(preset)
