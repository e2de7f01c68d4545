"""The quickstart's arms: which students are trained, with which objective, and how runs are named.

An arm is one distillation recipe (loss weights, MLM masking smoothing, learning rate, steps) run
once per seed (and per teacher, for the main arms). Both families have the same arms, with the
family's language-model loss (`mlm` for BERT, `clm` for causal LMs) in place of `lm`:

- main arms, one run per teacher and seed, evaluated on the test part for perplexity and IIA:
    standard       the default objective (DEFAULTS) at the learning rate tuned on the validation part
    diito          the default objective + DIITO's causal_ce term, its weight tuned on the validation part
    standard_eqc   the default objective given a DIITO run's compute (steps x counted FLOPs ratio)
    seed_standard  the seed's recipe: ce + lm + cos, 0.25 each, masking smoothed (0.7), the seed's rate
                   (not in the study preset: `Preset.seed_recipe`)
  and DIITO's controls (same initialisation, data and steps as DIITO):
    ctl_weight     weight-matched: DIITO's causal_ce weight given to ce instead
    ctl_source_kd  standard distillation also on the source sequences DIITO sees (--source_kd)
    ctl_misaligned DIITO with a mapping whose sites do not correspond (`misaligned_layers`)
  and, with a preset's `low_resource` fraction, the low-resource regime (the same part of the data for each):
    standard_low   standard distillation on that fraction of the training sequences (--data_fraction)
    diito_low      DIITO on the same fraction
- tuning arms (`tuning_arms`), first teacher, every seed, read on the validation part: the
  standard objective at each of the preset's `tune_lrs`, then DIITO at the chosen rate with each of
  its `tune_weights`: the same number of tries for each;
- ablation arms, one run per seed with the first teacher, read on the validation part: each loss
  term alone and the seed's combination with and without smoothing at the ablation's learning rate
  (the preset's `ablation_lr`) and the seed's recipe with DIITO's term; for causal LMs also the
  default objective with the generalised JSD in place of the KL, and with half the batches
  on-policy (the student's own samples).

Held-out evaluation (both families) and the choice of DEFAULTS are described in docs/quickstart.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOSSES = ("ce", "mlm", "clm", "cos", "causal_ce")
SEED_SMOOTHING = 0.7  # --mlm_smoothing of the seed (and of the original and HF DistilBERT)
NAMES = {"bert": "BERT", "llama": "Llama", "gpt2": "GPT-2"}  # each family's name in the report
DIITO_WEIGHT = 0.25  # DIITO's causal_ce weight, added to an objective


@dataclass(frozen=True)
class Arm:
    """One recipe. `alphas`: (loss, weight) pairs with `lm` for the family's LM loss; `lr`: which of the preset's
    learning rates."""

    name: str
    label: str
    alphas: tuple[tuple[str, float], ...]
    smoothing: float | None = None  # --mlm_smoothing (masked LMs only); None: no MLM masking settings
    lr: str | float = "default"  # default (the preset's student_lr), seed (seed_lr), ablation (ablation_lr) or a rate
    equal_compute: bool = False
    main: bool = True  # trained with every teacher, evaluated on the test part, for IIA too
    flags: tuple[str, ...] = ()  # more causal_train.py flags (another divergence, on-policy samples, --source_kd)
    mapping: str = "aligned"  # DIITO's neuron mapping: aligned (diito.nm) or misaligned (misaligned.nm)
    notes: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def causal(self) -> bool:
        return any(k == "causal_ce" and w > 0 for k, w in self.alphas)

    def weights(self, lm: str) -> dict[str, float]:
        """--alpha_* of every loss the quickstart uses (explicit zeros: causal_train.py's defaults are not 0)."""
        out = dict.fromkeys(LOSSES, 0.0)
        for k, w in self.alphas:
            out[lm if k == "lm" else k] = w
        return out

    def objective(self, lm: str) -> str:
        """The objective in words: `ce 0.25 + mlm 0.25 (smoothing 0)`."""
        terms = " + ".join(f"{lm if k == 'lm' else k} {w:g}" for k, w in self.alphas if w > 0)
        if self.smoothing is not None and any(k == "lm" for k, w in self.alphas if w > 0):
            terms += f" (smoothing {self.smoothing:g})"
        if self.flags:
            terms += f" ({' '.join(self.flags)})"
        if self.causal and self.mapping != "aligned":
            terms += f" ({self.mapping} mapping)"
        return terms


def weight_matched(objective: tuple[tuple[str, float], ...], weight: float) -> tuple[tuple[str, float], ...]:
    """`objective` with `weight` more on ce (DIITO's causal_ce weight, given to the soft targets instead)."""
    if not any(k == "ce" for k, _ in objective):
        return objective + (("ce", weight),)
    return tuple((k, w + weight if k == "ce" else w) for k, w in objective)


def build_arms(mlm: bool, default: tuple[tuple[str, float], ...], default_smoothing: float | None,
               lr: str | float = "default", weight: float = DIITO_WEIGHT,
               low_resource: float | None = None, seed_recipe: bool = True) -> dict[str, Arm]:
    """The arms of one family, by name (main arms first). `default`: the standard objective, as (loss, weight);
    `lr` and `weight`: the standard arm's learning rate and DIITO's causal_ce weight (tuned: `tuning_arms`);
    `low_resource`: the share of the data the low-resource arms train on (None: no such arms); `seed_recipe`: the
    seed's recipe as a main arm."""
    seed_combo = (("ce", 0.25), ("lm", 0.25), ("cos", 0.25))
    s_seed = SEED_SMOOTHING if mlm else None
    s_default = default_smoothing if mlm else None
    lm = "mlm" if mlm else "clm"
    diito = default + (("causal_ce", weight),)
    arms = [
        Arm("standard", "standard distillation", default, s_default, lr=lr),
        Arm("diito", "DIITO", diito, s_default, lr=lr),
        Arm("standard_eqc", "standard distillation, DIITO's compute", default, s_default, lr=lr, equal_compute=True),
        *([Arm("seed_standard", "the seed's recipe (standard)", seed_combo, s_seed, lr="seed")] if seed_recipe else []),
        Arm("ctl_weight", f"control: weight-matched (ce + {weight:g} instead of causal_ce)",
            weight_matched(default, weight), s_default, lr=lr),
        Arm("ctl_source_kd", "control: source-KD (standard also on DIITO's source sequences)", default, s_default,
            lr=lr, flags=("--source_kd",)),
        Arm("ctl_misaligned", "control: DIITO with a misaligned mapping", diito, s_default, lr=lr,
            mapping="misaligned"),
    ]
    if low_resource:
        flags = ("--data_fraction", f"{low_resource:g}")
        arms += [
            Arm("standard_low", f"standard distillation, {low_resource:g} of the data", default, s_default, lr=lr,
                flags=flags),
            Arm("diito_low", f"DIITO, {low_resource:g} of the data", diito, s_default, lr=lr, flags=flags),
        ]
    arms += [
        # ablation: every term alone and the seed's combination at the ablation's rate
        Arm("abl_ce", "ce alone", (("ce", 0.25),), s_seed, lr="ablation", main=False),
        Arm("abl_lm", f"{lm} alone", (("lm", 0.25),), s_seed, lr="ablation", main=False),
    ]
    if mlm:
        arms.append(Arm("abl_lm_s0", f"{lm} alone, no smoothing", (("lm", 0.25),), 0.0, lr="ablation", main=False))
    arms += [
        Arm("abl_cos", "cos alone", (("cos", 0.25),), s_seed, lr="ablation", main=False),
        Arm("abl_causal_ce", "causal_ce alone (DIITO's term)", (("causal_ce", DIITO_WEIGHT),), s_seed, lr="ablation",
            main=False),
        Arm("abl_seed_combo", "the seed's combination", seed_combo, s_seed, lr="ablation", main=False),
    ]
    if mlm:
        arms.append(Arm("abl_seed_combo_s0", "the seed's combination, no smoothing", seed_combo, 0.0, lr="ablation",
                        main=False))
    else:  # the objectives of today's distillation tools, against the default objective at its own rate
        arms += [
            Arm("abl_jsd", "the default objective, generalised JSD (beta 0.5) for ce", default, s_default,
                main=False, flags=("--divergence", "jsd", "--jsd_beta", "0.5")),
            Arm("abl_on_policy", "the default objective, half the batches the student's own samples", default,
                s_default, main=False, flags=("--on_policy_fraction", "0.5")),
        ]
    arms += [
        Arm("seed_diito", "the seed's recipe + causal_ce (DIITO)", seed_combo + (("causal_ce", DIITO_WEIGHT),),
            s_seed, lr="seed", main=False),
    ]
    return {a.name: a for a in arms}


def ablation_rows(arms: dict[str, Arm]) -> list[str]:
    """The arms of the ablation table, in its order: the terms alone, combinations, rates, DIITO's term."""
    order = ["abl_ce", "abl_lm", "abl_lm_s0", "abl_cos", "abl_causal_ce", "abl_seed_combo", "abl_seed_combo_s0",
             "abl_jsd", "abl_on_policy", "seed_diito"]
    return [name for name in order if name in arms]


CONTROLS = ("ctl_weight", "ctl_source_kd", "ctl_misaligned")
CONTROL_NAMES = {"ctl_weight": "weight-matched", "ctl_source_kd": "source-KD", "ctl_misaligned": "misaligned mapping"}


def tuning_arms(arms: dict[str, Arm], lrs: tuple[float, ...], weights: tuple[float, ...] = (),
                lr: float | None = None) -> dict[str, Arm]:
    """The tuning runs (read on the validation part): the standard objective at each rate of `lrs` (`tune_lr<i>`),
    and with `weights` DIITO at rate `lr` with each causal_ce weight (`tune_w<j>`)."""
    standard = arms["standard"]
    out = {f"tune_lr{i}": Arm(f"tune_lr{i}", f"standard distillation, learning rate {r:g}", standard.alphas,
                              standard.smoothing, lr=r, main=False) for i, r in enumerate(lrs, 1)}
    if weights:
        out.update({f"tune_w{j}": Arm(f"tune_w{j}", f"DIITO, causal_ce {w:g}, learning rate {lr:g}",
                                      standard.alphas + (("causal_ce", w),), standard.smoothing, lr=lr, main=False)
                    for j, w in enumerate(weights, 1)})
    return out


def misaligned_layers(teacher_layers: list[int], n_teacher_layers: int) -> list[int]:
    """Teacher blocks that do not correspond to the student's: each student block gets the teacher block of the
    next student block (a rotation); a one-block student, the teacher block half the teacher's depth away."""
    if len(teacher_layers) > 1:
        return teacher_layers[1:] + teacher_layers[:1]
    return [(teacher_layers[0] + n_teacher_layers // 2) % n_teacher_layers]


def run_name(arm: str, teacher: int, seed: int) -> str:
    """The folder name of one run: `standard_seed1` (first teacher), `standard_t2_seed1` (second)."""
    return f"{arm}_seed{seed}" if teacher == 1 else f"{arm}_t{teacher}_seed{seed}"


def teacher_name(k: int) -> str:
    """The folder of teacher k (1-based): `teacher`, `teacher_t2`, ..."""
    return "teacher" if k == 1 else f"teacher_t{k}"


def init_name(k: int) -> str:
    """The folder of the student extracted from teacher k: `student_init`, `student_init_t2`, ..."""
    return "student_init" if k == 1 else f"student_init_t{k}"


def key_text(key: tuple[int, int], teachers: int) -> str:
    """A (teacher, seed) key in words, for JSON and tables: `seed 1`, or `teacher 2 seed 1`."""
    return f"seed {key[1]}" if teachers == 1 else f"teacher {key[0]} seed {key[1]}"


def learning_rate(arm: Arm, preset) -> float:
    """The learning rate an arm trains with under `preset`."""
    if not isinstance(arm.lr, str):
        return arm.lr
    return {"default": preset.student_lr, "seed": preset.seed_lr, "ablation": preset.ablation_lr}[arm.lr]
