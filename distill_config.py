"""The settings of a distillation run: one frozen object, built once (`distill_setup.build`) from causal_train.py's
parsed arguments, the process's `devices.Runtime` and what loading the inputs found, and never written to later.

The flags keep their names, types and defaults (causal_train.py's parser is where the defaults and the help
live); the fields below the flags are derived. `parameters.json` records every field that JSON can hold.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from devices import Runtime
from losses import LOSS_NAMES, Divergence
from on_policy import OnPolicy


@dataclass(frozen=True)
class DistillConfig(Runtime):
    """The flags and what the run derived, over the `devices.Runtime` fields of this process (device and ranks;
    its local_rank is also the original's flag)."""

    # --- causal_train.py's flags (defaults and help: distill_setup.build_parser) ---
    force: bool
    dump_path: str
    data_file: str
    student_type: str
    student_config: str
    student_pretrained_weights: str | None
    teacher_type: str
    teacher_name: str
    tokenizer_name: str | None
    neuron_mapping: str | None
    temperature: float
    alpha_ce: float
    alpha_mlm: float
    alpha_clm: float
    alpha_mse: float
    alpha_cos: float
    alpha_causal_ce: float
    alpha_causal_cos: float
    divergence: str
    causal_divergence: str | None
    jsd_beta: float
    skew: float
    on_policy_fraction: float
    on_policy_prompt_tokens: int
    on_policy_new_tokens: int
    on_policy_temperature: float
    on_policy_top_k: int
    mlm: bool
    mlm_mask_prop: float
    word_mask: float
    word_keep: float
    word_rand: float
    mlm_smoothing: float
    token_counts: str | None
    interchange_prop: float
    interchange_max_token: int
    interchange_consecutive_only: bool
    interchange_masked_token_only: bool
    data_augment: bool
    include_crossway: bool
    source_kd: bool
    data_fraction: float
    restrict_ce_to_mask: bool
    no_shared_prefix: bool
    freeze_pos_embs: bool
    freeze_token_type_embds: bool
    n_epoch: int
    max_steps: int
    batch_size: int
    group_by_size: bool
    pad_to_multiple_of: int  # resolved: 64 on CUDA, 1 on the CPU when not given
    gradient_accumulation_steps: int
    warmup_prop: float
    weight_decay: float
    learning_rate: float
    adam_epsilon: float
    max_grad_norm: float
    initializer_range: float
    fp16: bool
    bf16: bool
    compile: bool
    n_gpu: int
    fsdp: bool
    fsdp_teacher: bool
    fsdp_cpu_offload: bool
    seed: int
    log_interval: int | None
    checkpoint_interval: int
    save_total_limit: int
    snapshot_interval: int
    resume: bool
    resume_from: str | None
    skip_nonfinite_steps: int
    num_workers: int
    allow_tokenizer_mismatch: bool
    max_model_input_size: int  # resolved: the smaller position table of the two models when not given
    no_progress: bool
    is_wandb: bool
    run_name: str | None
    cache_dir: str | None
    # --- what loading the inputs found ---
    special_tok_ids: dict[str, int]  # the tokenizer's special ids (cls, sep, pad, unk, mask, bos, eos)
    tokenizer_vocab_hash: str | None  # the tokenizer's vocabulary fingerprint, checked against --data_file's
    tokenizer_size: int | None
    data_fingerprint: dict | None  # --data_file's size and checksum when the run started (checked on resume)

    @classmethod
    def from_args(cls, args: argparse.Namespace, runtime: Runtime, **derived) -> "DistillConfig":
        """The config of the parsed `args`, the process's `runtime` and the `derived` fields (which may also
        resolve a flag left at None). A missing or unknown field is an error: the parser and this class agree."""
        values = {**vars(args), **vars(runtime), **derived}
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(values) - names), sorted(names - set(values))
        if unknown or missing:
            raise TypeError(f"DistillConfig: unknown fields {unknown}, missing fields {missing}")
        return cls(**values)

    @classmethod
    def in_memory(cls, args: argparse.Namespace, runtime: Runtime, special_tok_ids: dict[str, int],
                  max_model_input_size: int) -> "DistillConfig":
        """The config of a run on models and data made in memory (the benchmark, the tests): no tokenizer or data
        file was read, so their fingerprints are None; what the flags leave open is resolved as `build` does."""
        return cls.from_args(args, runtime, special_tok_ids=special_tok_ids, tokenizer_vocab_hash=None,
                             tokenizer_size=None, data_fingerprint=None,
                             max_model_input_size=args.max_model_input_size or max_model_input_size,
                             pad_to_multiple_of=args.pad_to_multiple_of or (64 if runtime.device.type == "cuda" else 1))

    @property
    def alphas(self) -> dict[str, float]:
        """The weight of each loss of `losses.LOSS_NAMES`."""
        return {name: float(getattr(self, f"alpha_{name}")) for name in LOSS_NAMES}

    @property
    def soft_target_divergence(self) -> Divergence:
        """What `ce` measures between the softened teacher and student distributions (--divergence)."""
        return Divergence(self.divergence, beta=self.jsd_beta, skew=self.skew)

    @property
    def causal_soft_target_divergence(self) -> Divergence:
        """What `causal_ce` measures (--causal_divergence, else --divergence)."""
        return Divergence(self.causal_divergence or self.divergence, beta=self.jsd_beta, skew=self.skew)

    @property
    def on_policy(self) -> OnPolicy | None:
        """The on-policy sampling of the run (--on_policy_*), or None when it is off."""
        if not self.on_policy_fraction:
            return None
        ids = self.special_tok_ids
        return OnPolicy(fraction=self.on_policy_fraction, prompt_tokens=self.on_policy_prompt_tokens,
                        new_tokens=self.on_policy_new_tokens, temperature=self.on_policy_temperature,
                        top_k=self.on_policy_top_k, seed=self.seed, eos_id=ids.get("eos_token", ids["sep_token"]),
                        pad_id=ids["pad_token"], max_len=self.max_model_input_size)

    @property
    def amp_dtype(self):
        """The autocast precision (None: fp32)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None
