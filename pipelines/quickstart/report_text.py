"""The text of the quickstart's `report.md` (both families); the numbers come from `pipelines.quickstart.report`."""
from __future__ import annotations

import datetime as dt

from pipelines.quickstart.arms import NAMES, SEED_SMOOTHING
from pipelines.quickstart.stats import TEST_NAME
from pipelines.stages import format_seconds


def _evaluation_text(q, corpus: dict, vocab: int, evals_blocks) -> str:
    p = q.preset
    if q.lm == "mlm":
        return (f"Test perplexity is `run_mlm.py --do_eval` on the {corpus['test_documents']} paragraphs of the test "
                f"part ({corpus['test_words']} words), one sequence per paragraph truncated to {p.max_seq_length} "
                f"tokens, 15% of tokens masked uniformly with the same `--eval_mask_seed` for every model. Chance is the "
                f"vocabulary size, {vocab}.")
    return (f"Test perplexity is `run_clm.py --do_eval` on the {corpus['test_documents']} paragraphs of the test part "
            f"({corpus['test_words']} words), each closed with EOS, concatenated and cut into fixed blocks of "
            f"{p.max_seq_length} tokens ({evals_blocks} blocks), the same for every model: exp of the mean next-token "
            f"cross-entropy. Chance is the vocabulary size, {vocab}.")


def _edge(p, choice: dict) -> str:
    """A warning when a choice is at the edge of its grid: beyond it might be better still."""
    edges = [f"the learning rate ({choice['lr']:g})" for grid, v in ((p.tune_lrs, choice["lr"]),)
             if len(grid) > 1 and v in (min(grid), max(grid))]
    # the weight with the lowest mean says where a better weight may lie, not the one the rule chose beside it
    lowest = choice.get("lowest_mean_weight", choice["weight"])
    edges += [f"DIITO's weight ({lowest:g}" + ("" if lowest == choice["weight"] else ", the lowest mean") + ")"
              for grid, v in ((p.tune_weights, lowest),) if len(grid) > 1 and v in (min(grid), max(grid))]
    return (f" **At the edge of its grid**: {' and '.join(edges)}; a value beyond it might do better, so the tuned "
            f"recipe may not be the best of its kind.") if edges else ""


def _lowest(choice: dict) -> str:
    lowest = choice.get("lowest_mean_weight", choice["weight"])
    return "" if lowest == choice["weight"] else f" (the lowest mean: {lowest:g})"


def _downstream_section(q, tables: dict) -> str:
    """Each model fine-tuned on the downstream tasks (`scripts/make_downstream_tasks.py`), accuracy on the test part."""
    if not tables.get("downstream"):
        return ""
    p = q.preset
    return f"""## Downstream tasks (test part)

{tables['downstream']}
{tables['downstream_notes']}
Each model fine-tuned with `run_glue.py` (`run_ner.py` for `replaced`; {p.downstream_steps} steps of
{p.student_batch}, learning rate {p.downstream_lr:g}, a fresh classification head) on the task's train part and
scored on its test part, both drawn from the quickstart's split by document: `source` asks which documentation a
paragraph comes from, `same_document` whether two paragraphs share a document, `replaced` which words were swapped
for other words of the same frequencies (accuracy over words; only context tells). The teachers, the
initialisations and the random student are fine-tuned once per student seed, and each run is paired with its
initialisation fine-tuned under the same seed. The tasks with room are in the Holm correction with the other
comparisons.

"""


def _tuning_section(q, r, tables: dict, choice: dict) -> str:
    """The tuning and ablation section (validation part)."""
    p = q.preset
    if tables["tuning"]:
        tuning = f"""{tables['tuning']}
First teacher, every seed, {r.steps['standard']} steps, read on the validation part (never on the test part). The
standard objective's learning rate is chosen first ({len(p.tune_lrs)} tries), then DIITO's causal_ce weight at that
rate ({len(p.tune_weights)} tries): the same budget for each. The rate with the lowest mean validation perplexity is
chosen; DIITO's weight by the one-standard-error rule: the smallest weight whose mean is within one standard error
(over the seeds) of the lowest mean, since the weights' perplexities tend to differ by less than their spread over
seeds, where the lowest mean is a draw, and the smallest weight departs least from standard distillation. Chosen:
learning rate {choice['lr']:g}, DIITO's weight {choice['weight']:g}{_lowest(choice)}. The main runs of the first
teacher at the chosen values are these runs (the same command, copied), evaluated on the test part.{_edge(p, choice)}
"""
    else:
        tuning = (f"Not run (`--no_tuning`): learning rate {choice['lr']:g} and DIITO's weight {choice['weight']:g}, "
                  f"untuned.\n")
    if tables["ablation"]:
        ablation = f"""{tables['ablation']}
One run per seed with the first teacher, {r.steps['standard']} steps each, the same data and initialisation as the
main arms, read on the validation part against the initialisation's validation perplexity; "against the
initialisation" is the {TEST_NAME} of the change (p < 0.05 and beyond the seeds' spread to count; these rows are
not in the Holm correction: they describe the objectives, they are not the report's claims). Each loss term alone
and the seed's combination run at the ablation's learning rate ({p.ablation_lr:g}); the seed's recipe at its own
({p.seed_lr:g}).""" + (f""" `smoothing` is `--mlm_smoothing`: masked positions are drawn with weight
count^-smoothing, so with {SEED_SMOOTHING:g} (the seed's, the original's and HF DistilBERT's) rare tokens are masked
far more often than they occur, while evaluation masks uniformly; with 0 every token is equally likely
(docs/differences.md).""" if q.lm == 'mlm' else "") + """

![ablation](plots/ablation.png)
"""
    else:
        ablation = "The ablation was not run (`--no_ablation`, or a preset without it).\n"
    return f"## Tuning and ablation (validation part)\n\n{tuning}\n{ablation}"


# measured in docs/quickstart.md: the same seed on native kernels trained another teacher, and 3 of the 10
# differences its seeds called clear were not clear with it
_ONE_TEACHER = ("With one teacher no verdict is made: a test over its seeds measures that teacher only, and another "
                "teacher (another seed, or the same seed computed on another CPU kind) can say otherwise. Its "
                "outcome is shown after \"its seeds\"; for verdicts, `--preset study` or `--teachers 5`.")


def _seed_recipe(arms: dict, lm: str, p) -> str:
    """The seed's recipe in the method notes, where the preset runs it."""
    if "seed_standard" not in arms:
        return ""
    return f" The seed's recipe: `{arms['seed_standard'].objective(lm)}`, learning rate {p.seed_lr:g}."


def _method_notes(q, r, corpus: dict, vocab: int, flops: dict, mapping, covers: str, choice: dict) -> str:
    """The bullets under the result: how each figure is measured and what its ± covers."""
    p, lm, n_t, arms = q.preset, q.lm, len(r.teachers), q.arms
    wrong = q.misaligned_layers
    return f"""- {_evaluation_text(q, corpus, vocab, r.q.eval_blocks)}
- Effective IIA, the headline alignment figure, is `run_iia.py` on the test part with DIITO's mapping
  (`student_init/diito.nm`) on {p.iia_pairs} pairs: among the positions where an interchange intervention (student
  block i's output at 30% of the positions, a consecutive span, taken from another paragraph) changed the
  teacher's own prediction (teacher block {mapping}, in order), the share where the student's prediction after the
  same intervention equals the teacher's. IIA counts every position, so it is mostly base agreement (the share of
  positions where the two agree with no intervention), shown beside it. The maps are identity slices, not learned:
  a learned non-linear map reaches about 100% IIA even on random models (docs/iia.md).
- IIA at sites DIITO did not train on: the same measure with the misaligned mapping (student block i against
  teacher block {wrong}), which only the misaligned control trained on.
- The student at initialisation is the student every run starts from (the teacher's blocks {mapping},
  `student_init/model`), not trained; the random student has the same shape and random weights.
- Standard distillation: `{arms['standard'].objective(lm)}`, learning rate {choice['lr']:g}; DIITO adds
  `causal_ce {choice['weight']:g}` with the mapping above (both tuned on the validation part, below). Controls, with
  DIITO's initialisation, data and steps: weight-matched (`{arms['ctl_weight'].objective(lm)}`), source-KD (the
  standard objective on the base and the source sequences a DIITO step draws, `--source_kd`), misaligned (DIITO
  with the misaligned mapping).{_seed_recipe(arms, lm, p)} Batches of {p.student_batch} sequences.
- Equal compute: `scripts/count_step_flops.py` counts the FLOPs of the first training steps of each objective
  (every matmul, forward and backward): {flops['standard'] / 1e9:.3g} GFLOP per standard step,
  {flops['diito'] / 1e9:.3g} per DIITO step, a ratio of {flops['ratio']:.2f}. The equal-compute arm runs
  {r.steps['standard_eqc']} standard steps, the compute of a DIITO run; its learning-rate schedule spans its own
  steps. The curves below show both arms along the way.
- Verdicts: {TEST_NAME}, runs with the same teacher and seed paired; Holm's correction over the
  {len(r.comparisons)} comparisons of the tables above; a difference counts only with a corrected p < 0.05 and when
  it exceeds the seeds' spread (the larger standard deviation over seeds within a teacher); otherwise "no clear
  difference". {_ONE_TEACHER if n_t == 1 else ''}
- ± is the sample standard deviation over {covers}. It does not cover what is fixed in a run: the corpus and its
  split, the tokenizer and the evaluation masking{' and the teacher' if n_t == 1 else ''} are the same for every
  student.
"""


def _environment_lines(env: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    pins = ", ".join(f"{k}={v}" for k, v in env["pinned"].items()) or "none"
    return (f"- Environment: Python {env['python']}, {packages}; CPU {env['cpu']} ({env['machine']}), PyTorch kernels "
            f"{env['kernels']} (pinned: {pins}).")


def _setup_section(q, corpus: dict, vocab: int, stages: dict, mapping, n_t: int, env: dict) -> str:
    """The set-up: corpus, tokenizer, teachers, students and the environment."""
    p = q.preset
    return f"""## Set-up

- Corpus: {corpus['origin']}. Split by document (a module, topic or package file is wholly in one part), no
  paragraph in two parts: train {corpus['train_documents']} paragraphs ({corpus['train_words']} words), validation
  {corpus['validation_documents']} ({corpus['validation_words']} words), test {corpus['test_documents']}
  ({corpus['test_words']} words).
- Tokenizer: {vocab} entries ({'--tokenizer ' + q.args.tokenizer if q.args.tokenizer else q.tokenizer_title()}).
- Teacher{'s' if n_t > 1 else ''}: {NAMES[q.family]}, {p.teacher_layers} layers, hidden {p.hidden}, {p.heads} heads,
  FFN {p.ffn}, {stages['teacher']['steps']} steps of {p.teacher_batch} sequences, learning rate {p.teacher_lr}{
  f' ({n_t} teachers, seeds ' + ', '.join(str(stages[t]['seed']) for t in stages if t.startswith('teacher')) + ')'
  if n_t > 1 else ''}.
- Students: {p.student_layers} layer(s) of the same width, initialised from teacher blocks {mapping}
  (`{q.extract_script}`).
{_environment_lines(env)}
- Every command is in `commands.sh`, its output in `logs/`.
"""


def report_markdown(q, r, machine: str, tables: dict, sentence: str, corpus: dict, vocab: int, flops: dict,
                    stages: dict, stage_rows: list[str], total: float, env: dict) -> str:
    """The text of report.md."""
    seeds = q.seeds
    n_t = len(r.teachers)
    mapping = stages["student_init"]["teacher_layers"]
    q.misaligned_layers = stages["student_init"].get("misaligned_layers")
    choice = stages["tuning"]
    covers = (f"seeds {', '.join(map(str, seeds))} of the students" if n_t == 1 else
              f"{n_t} teachers (seeds {', '.join(str(stages[t]['seed']) for t in stages if t.startswith('teacher'))}) "
              f"x seeds {', '.join(map(str, seeds))} of the students")
    warnings = "".join(f"> **Warning**: {w}: the numbers may differ from the documented ones.\n"
                       for w in env["warnings"])
    return f"""# Quickstart report ({NAMES[q.family]})

{dt.date.today().isoformat()}, preset `{q.args.preset}`, `--family {q.family}`, {machine}.

{warnings}## Verdict

{sentence}

## Result (test part)

{tables['main']}
{_method_notes(q, r, corpus, vocab, flops, mapping, covers, choice)}
![test perplexity](plots/heldout_perplexity.png)

## DIITO against standard distillation and its controls

{tables['diito']}
The per-seed view is the paired t-test over every (teacher, seed) pair, without the correction: with several
teachers it treats seeds of one teacher as independent, which they are not, so the verdict does not use it.

{_downstream_section(q, tables)}## Learning curves (first teacher, mean over seeds)

{tables['curves']}
![learning curves](plots/curves.png)

## Alignment at sites DIITO did not train on

{tables['untrained']}
![alignment heatmaps](plots/iia_heatmaps.png)

IIA of every (teacher block, student block) pair of full-width sites (`run_iia.py --sweep`): the student at
initialisation and seed {seeds[0]}'s standard and DIITO students.

{_tuning_section(q, r, tables, choice)}
![training losses](plots/training_losses.png)

{_setup_section(q, corpus, vocab, stages, mapping, n_t, env)}
## Time per stage

Wall times on the machine above; when it is shared with other jobs (see its load average) they are inflated.

| stage | wall time | finished |
|---|---|---|
{chr(10).join(stage_rows)}

Sum: {format_seconds(total)} (stages skipped on a re-run keep the time of the run that did them).
"""
