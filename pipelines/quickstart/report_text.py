"""The text of the quickstart's `report.md` (both families); the numbers come from `pipelines.quickstart.report`."""
from __future__ import annotations

import datetime as dt

from pipelines.quickstart.arms import DIITO_WEIGHT, NAMES, SEED_SMOOTHING
from pipelines.quickstart.stats import TEST_NAME
from pipelines.stages import format_seconds


def _evaluation_text(q, corpus: dict, vocab: int, evals_blocks) -> str:
    p = q.preset
    if q.lm == "mlm":
        return (f"Held-out perplexity is `run_mlm.py --do_eval` on {corpus['heldout_documents']} held-out paragraphs "
                f"({corpus['heldout_words']} words), one sequence per paragraph truncated to {p.max_seq_length} tokens, "
                f"15% of tokens masked uniformly with the same `--eval_mask_seed` for every model. Chance is the "
                f"vocabulary size, {vocab}.")
    return (f"Held-out perplexity is `run_clm.py --do_eval` on {corpus['heldout_documents']} held-out paragraphs "
            f"({corpus['heldout_words']} words), each closed with EOS, concatenated and cut into fixed blocks of "
            f"{p.max_seq_length} tokens ({evals_blocks} blocks), the same for every model: exp of the mean next-token "
            f"cross-entropy. Chance is the vocabulary size, {vocab}.")


def _ablation_section(q, r, abl: str) -> str:
    """The ablation's section: its table and how to read it, or a line saying it was not run."""
    p = q.preset
    return (f"""## Ablation

{abl}
One run per seed with the first teacher, {r.steps['standard']} steps each, the same data, initialisation and
evaluation as the main arms; "against the initialisation" is the {TEST_NAME} of the change (p < 0.05 and beyond
the seeds' spread to count). Each loss term alone and the seed's combination run at the ablation's learning rate
({p.ablation_lr:g}), and so does the default objective once more: against the default recipe (the same objective at
{p.student_lr:g}) that row shows how the default rate was chosen. The seed's recipe runs at its own rate
({p.seed_lr:g}).""" + (f""" `smoothing` is `--mlm_smoothing`:
masked positions are drawn with weight count^-smoothing, so with {SEED_SMOOTHING:g} (the seed's, the original's and HF
DistilBERT's) rare tokens are masked far more often than they occur, while held-out evaluation masks uniformly;
with 0 every token is equally likely (docs/differences.md)."""if q.lm == 'mlm' else "") + """

![ablation](plots/ablation.png)
""") if abl else "## Ablation\n\nNot run (`--no_ablation`).\n"


def _method_notes(q, r, corpus: dict, vocab: int, flops: dict, mapping, covers: str) -> str:
    """The bullets under the result: how each figure is measured and what its ± covers."""
    p, lm, n_t, default, arms = q.preset, q.lm, len(r.teachers), q.arms["standard"], q.arms
    return f"""- {_evaluation_text(q, corpus, vocab, r.q.eval_blocks)}
- IIA is `run_iia.py` on the same held-out paragraphs with DIITO's mapping (`student_init/diito.nm`), pooled over
  its entries: the share of evaluated positions where the student's prediction after an interchange intervention
  (student block i's output at 30% of the positions, a consecutive span, taken from another paragraph) equals the
  teacher's after the same intervention on teacher block {mapping} (in order), on {p.iia_pairs} pairs. Effective
  IIA counts only the positions where the intervention changed the teacher's own prediction; base agreement is the
  share of positions where the two agree with no intervention, the yardstick IIA is read against. The maps are
  identity slices (student block i's whole output stands for teacher block j's), not learned: a learned
  non-linear map reaches about 100% IIA even on random models (docs/iia.md), which would make IIA meaningless.
- The student at initialisation is the student every run starts from (the teacher's blocks {mapping},
  `student_init/model`), not trained; the random student has the same shape and random weights. The change from
  the initialisation is each run minus the initialisation of its teacher, with a 95% Student-t interval.
- Standard distillation (the default recipe): `{default.objective(lm)}`, learning rate {p.student_lr:g}. DIITO adds
  `causal_ce {DIITO_WEIGHT:g}` with the mapping above. The seed's recipe: `{arms['seed_standard'].objective(lm)}`,
  learning rate {p.seed_lr:g} (the quickstart's recipe until issue 20). All start from the same extracted
  student with the same seeds and batches of {p.student_batch} sequences.
- Equal compute: `scripts/count_step_flops.py` counts the FLOPs of the first training steps of each objective
  (every matmul, forward and backward): {flops['standard'] / 1e9:.3g} GFLOP per standard step,
  {flops['diito'] / 1e9:.3g} per DIITO step, a ratio of {flops['ratio']:.2f}. The equal-compute arm runs
  {r.steps['standard_eqc']} standard steps, the compute of a DIITO run; its learning-rate schedule spans its own
  steps. Counted FLOPs, not wall time, so that the same command gives the same numbers.
- Verdicts are two-sided and noise-aware: {TEST_NAME} (runs with the same teacher and seed are paired); a
  difference counts only with p < 0.05 and when it exceeds the seeds' spread (the larger standard deviation over seeds within a teacher);
  otherwise "no clear difference".
- ± is the sample standard deviation over {covers}. It does not cover what is fixed in a run: the corpus and its
  split, the tokenizer and the held-out masking{' and the teacher' if n_t == 1 else ''} are the same for every
  student, so it says nothing of how the comparison moves with another tokenizer or corpus.
- The same command gives the same numbers: every stage is seeded and reproducible on the CPU.
"""


def _setup_section(q, corpus: dict, vocab: int, stages: dict, mapping, n_t: int) -> str:
    """The set-up: corpus, tokenizer, teachers and students."""
    p, versions = q.preset, corpus.get("versions") or {}
    return f"""## Set-up

- Corpus: {corpus['origin']}. Train part: {corpus['train_documents']} paragraphs ({corpus['train_words']} words);
  held-out part: {corpus['heldout_documents']} paragraphs ({corpus['heldout_words']} words); split by document
  (a module, topic or package file is wholly in one part), no paragraph in both.
  Versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or 'your --text files'}.
- Tokenizer: {vocab} entries ({'--tokenizer ' + q.args.tokenizer if q.args.tokenizer else q.tokenizer_title()}).
- Teacher{'s' if n_t > 1 else ''}: {NAMES[q.family]}, {p.teacher_layers} layers, hidden {p.hidden}, {p.heads} heads,
  FFN {p.ffn}, {stages['teacher']['steps']} steps of {p.teacher_batch} sequences, learning rate {p.teacher_lr}
  {f'({n_t} teachers, seeds ' + ', '.join(str(stages[t]['seed']) for t in stages if t.startswith('teacher')) + ')' if n_t > 1 else ''}.
- Students: {p.student_layers} layer(s) of the same width, initialised from teacher blocks {mapping}
  (`{q.extract_script}`).
- Every command is in `commands.sh`, its output in `logs/`.
"""


def report_markdown(q, r, machine: str, table: str, abl: str, sentence: str, corpus: dict, vocab: int, flops: dict,
                    stages: dict, stage_rows: list[str], total: float) -> str:
    """The text of report.md."""
    seeds = q.seeds
    n_t = len(r.teachers)
    mapping = stages["student_init"]["teacher_layers"]
    covers = (f"seeds {', '.join(map(str, seeds))} of the students" if n_t == 1 else
              f"{n_t} teachers (seeds {', '.join(str(stages[t]['seed']) for t in stages if t.startswith('teacher'))}) "
              f"x seeds {', '.join(map(str, seeds))} of the students")
    return f"""# Quickstart report ({NAMES[q.family]})

{dt.date.today().isoformat()}, preset `{q.args.preset}`, `--family {q.family}`, {machine}.

## Result

{table}
{sentence}

{_method_notes(q, r, corpus, vocab, flops, mapping, covers)}
![held-out perplexity](plots/heldout_perplexity.png)

![alignment heatmaps](plots/iia_heatmaps.png)

IIA of every (teacher block, student block) pair of full-width sites (`run_iia.py --sweep`): the student at
initialisation and seed {seeds[0]}'s standard and DIITO students.

{_ablation_section(q, r, abl)}
![training losses](plots/training_losses.png)

{_setup_section(q, corpus, vocab, stages, mapping, n_t)}
## Time per stage

Wall times on the machine above; when it is shared with other jobs (see its load average) they are inflated.

| stage | wall time | finished |
|---|---|---|
{chr(10).join(stage_rows)}

Sum: {format_seconds(total)} (stages skipped on a re-run keep the time of the run that did them).
"""
