"""The quickstart report's statistics, verdict and tables, on made-up records (no training)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import quickstart
from pipelines.quickstart import mlm as quickstart_mlm
from pipelines.quickstart import clm as quickstart_clm
from pipelines.quickstart.arms import CONTROLS, ablation_rows, build_arms, misaligned_layers, run_name, tuning_arms
from pipelines.quickstart.report import Results, ablation_table, tuning_table, verdict
from pipelines.quickstart.stats import Comparison, against_reference, compare, paired_p
from pipelines.stages import format_seconds


def test_paired_t_test_matches_scipy_and_is_two_sided():
    from scipy.stats import ttest_rel

    a = {1: 10.0, 2: 11.5, 3: 9.0, 4: 12.0}
    b = {1: 10.5, 2: 12.5, 3: 9.2, 4: 13.1}
    c = compare(a, b, lower_is_better=True)
    assert c.p == pytest.approx(ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert c.p == compare(b, a, lower_is_better=True).p  # two-sided: the order does not matter
    assert c.diff == pytest.approx(-0.7) and c.wins == 4 and c.lo < c.diff < c.hi
    assert paired_p([1.0, 1.0, 1.0]) == 0.0 and paired_p([0.0, 0.0]) == 1.0


def test_the_interval_is_students_t_with_n_minus_1_degrees_of_freedom():
    """Pinned against scipy: a t with n degrees of freedom (or a normal) gives a narrower interval."""
    from scipy import stats

    a = {1: 10.0, 2: 11.5, 3: 9.0}
    b = {1: 10.5, 2: 12.5, 3: 9.2}
    diffs = [a[k] - b[k] for k in a]
    c = compare(a, b, lower_is_better=True)
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert (c.lo, c.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert c.p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-12)
    wrong = stats.t.interval(0.95, len(diffs), loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert c.hi - c.lo > (wrong[1] - wrong[0]) * 1.2  # (3 pairs: t(2) is far wider than t(3))


def test_a_difference_counts_only_when_significant_and_beyond_the_spread():
    # consistent and large: better
    big = compare({1: 300.0, 2: 301.0, 3: 302.0}, {1: 320.0, 2: 321.5, 3: 322.0}, lower_is_better=True)
    assert big.outcome == "better" and big.p < 0.05
    # consistent (every seed lower, p < 0.05) but within the seeds' spread: not claimed
    within = compare({1: 300.0, 2: 305.0, 3: 310.0}, {1: 300.6, 2: 305.5, 3: 310.7}, lower_is_better=True)
    assert within.p < 0.05 and abs(within.diff) < within.spread and within.outcome == "no clear difference"
    # beyond the spread but not significant (the seeds disagree): not claimed either
    noisy = compare({1: 300.0, 2: 300.1, 3: 300.2}, {1: 310.0, 2: 300.1, 3: 310.2}, lower_is_better=True)
    assert noisy.p > 0.05 and abs(noisy.diff) > noisy.spread and noisy.outcome == "no clear difference"
    # the test preset's "DIITO won" for 307.11 against 307.70 with one seed: no test, no claim
    one = compare({1: 307.11}, {1: 307.70}, lower_is_better=True)
    assert one.outcome == "no clear difference" and one.p is None and "one seed" in one.interval()
    # higher is better (IIA): a clear drop is "worse"
    iia = compare({1: 0.50, 2: 0.51, 3: 0.52}, {1: 0.65, 2: 0.66, 3: 0.655}, lower_is_better=False)
    assert iia.outcome == "worse"
    # a claim about the method tested over one teacher's seeds decides nothing, however clear its outcome; a
    # comparison that only describes that teacher's runs (the ablation's) keeps it
    assert big.result == "no verdict (one teacher)" and big.clear
    assert compare({1: 300.0, 2: 301.0, 3: 302.0}, {1: 320.0, 2: 321.5, 3: 322.0}, True, claim=False).result == "better"


def test_against_the_initialisation_pairs_each_run_with_its_teachers_init():
    runs = {(1, 1): 10.0, (1, 2): 11.0, (2, 1): 20.0, (2, 2): 21.0}
    c = against_reference(runs, {1: 12.0, 2: 22.0}, lower_is_better=True)
    assert c.diff == pytest.approx(-1.5) and c.wins == 4


def test_the_spread_that_hides_a_difference_is_within_a_teacher_not_between_teachers():
    """The BERT study (two teachers, 3 seeds): DIITO against standard distillation at DIITO's compute differs by
    about +8 perplexity in every pair, while the teachers' students differ by about 16 from each other."""
    from scipy import stats

    diito = {(1, 1): 295.91, (1, 2): 295.86, (1, 3): 296.45, (2, 1): 310.95, (2, 2): 311.18, (2, 3): 311.15}
    eqc = {(1, 1): 286.61, (1, 2): 287.66, (1, 3): 287.44, (2, 1): 302.83, (2, 2): 303.81, (2, 3): 304.19}
    c = compare(diito, eqc, lower_is_better=True)
    within = [287.66 - 286.61, 287.44 - 286.61]  # hand-computed pooled within-teacher sd of eqc, the larger one
    eqc_sd = (sum((x - sum(v) / 3) ** 2 for v in ([286.61, 287.66, 287.44], [302.83, 303.81, 304.19]) for x in v)
              / 4) ** 0.5
    assert c.spread == pytest.approx(eqc_sd) and 0.5 < c.spread < max(within)
    # the unit is the teacher: two teachers are one degree of freedom, however consistent their six pairs
    per_teacher = [sum(diito[(k, s)] - eqc[(k, s)] for s in (1, 2, 3)) / 3 for k in (1, 2)]
    assert c.unit == "teacher" and c.n == 2 and c.pairs == 6 and c.wins == 0
    assert c.p == pytest.approx(stats.ttest_1samp(per_teacher, 0.0).pvalue, rel=1e-12) and c.p > 0.05
    assert c.result == "no clear difference"
    # the per-seed view (secondary) treats the six pairs as independent: what the report said before
    assert c.p_seed == pytest.approx(stats.ttest_rel(list(diito.values()), list(eqc.values())).pvalue)
    assert c.p_seed < 1e-4
    # one teacher: the pooled spread is the plain standard deviation over seeds, and the unit is the seed
    one = compare({1: 300.0, 2: 305.0, 3: 310.0}, {1: 300.6, 2: 305.5, 3: 310.7}, lower_is_better=True)
    assert one.spread == pytest.approx(5.1, abs=0.05) and one.unit == "seed" and one.p_seed == one.p
    # against the initialisation (one value per teacher) the teachers' difference is not spread either
    vs_init = against_reference(eqc, {1: 359.40, 2: 341.94}, lower_is_better=True)
    assert vs_init.spread == pytest.approx(eqc_sd)
    # one seed per teacher: no spread can be told, so nothing is claimed
    two = compare({(1, 1): 1.0, (2, 1): 5.0}, {(1, 1): 2.0, (2, 1): 6.0}, lower_is_better=True)
    assert two.spread is None and two.result == "no clear difference"


def test_five_teachers_are_five_units_tested_on_their_mean_differences():
    from scipy import stats

    diffs = {1: [-1.1, -0.9], 2: [-0.4, -0.6], 3: [-1.4, -1.2], 4: [-0.2, -0.3], 5: [-0.9, -1.0]}
    b = {(k, s): 300.0 + 10 * k + s for k in diffs for s in (1, 2)}
    a = {(k, s): b[(k, s)] + diffs[k][s - 1] for k in diffs for s in (1, 2)}
    c = compare(a, b, lower_is_better=True)
    means = [sum(v) / 2 for v in diffs.values()]
    assert c.unit == "teacher" and c.n == 5 and c.pairs == 10 and c.wins == 10
    assert c.diff == pytest.approx(sum(means) / 5)
    assert c.p == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue, rel=1e-12)
    lo, hi = stats.t.interval(0.95, 4, loc=stats.tmean(means), scale=stats.sem(means))
    assert (c.lo, c.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert "5 teachers" in c.evidence()


def test_holm_adjusts_step_down_and_can_take_a_claim_away():
    from pipelines.quickstart.stats import holm

    def made(p):
        return Comparison(3, 1.0, 2.0, -1.0, -1.5, -0.5, p, 0.1, 3, True)

    ps = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.2}
    adjusted = holm({k: made(p) for k, p in ps.items()})
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4 x 0.01, max(., 3 x 0.03), max(., 2 x 0.04), max(., 0.2)
    assert {k: c.p_holm for k, c in adjusted.items()} == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.2})
    assert made(0.03).outcome == "better" and adjusted["c"].outcome == "no clear difference"
    assert adjusted["a"].outcome == "better" and "Holm 0.04" in adjusted["a"].evidence()
    # comparisons without a test are left alone and do not count in m
    untested = Comparison(1, 1.0, 2.0, -1.0, None, None, None, None, 1, True)
    assert holm({"x": untested, "a": made(0.02)})["a"].p_holm == pytest.approx(0.02)


def fake_quickstart(arms, lm="mlm", seeds=(1, 2, 3), teachers=1):
    preset = replace_preset(quickstart.PRESETS["small"], teachers=teachers)
    q = SimpleNamespace(arms=arms, lm=lm, preset=preset, seeds=list(seeds), n_teachers=teachers, family="bert",
                        labels={"teacher": "teacher (BERT)", **{n: a.label for n, a in arms.items()}})
    q.ablation_table_arms = lambda: ablation_rows(arms)
    return q


def replace_preset(p, **kw):
    from dataclasses import replace

    return replace(p, **kw)


def fake_records(q, ppl_of, eff_of, init_ppl=276.0, init_eff=0.65, by_teacher=False):
    """Runs, evaluations and IIA records as the quickstart writes them; ppl_of(arm, seed) and eff_of(arm, seed)
    (effective IIA; IIA and base agreement are set apart from it, so that a verdict read off them would differ).
    With `by_teacher` they are ppl_of(arm, seed, teacher) and eff_of(arm, seed, teacher)."""
    runs, evals, alignment = {}, {}, {}
    for name, arm in q.arms.items():
        for k in range(1, (q.n_teachers if arm.main else 1) + 1):
            for s in q.seeds:
                run = run_name(name, k, s)
                runs[run] = {"objective": name, "teacher": k, "seed": s, "steps": 200, "train_seconds": 10.0,
                             "folder": f"/nowhere/{run}"}
                ppl, eff = (ppl_of(name, s, k), eff_of(name, s, k)) if by_teacher else (ppl_of(name, s) + (k - 1),
                                                                                         eff_of(name, s))
                evals[run] = {"perplexity": ppl}
                if arm.main:
                    alignment[run] = {"iia": 0.9, "effective_iia": eff, "base_agreement": 0.91, "iia_ci95": [0.6, 0.7]}
                    alignment[run + "@misaligned"] = {"iia": 0.8, "effective_iia": eff / 2}
    for k in range(1, q.n_teachers + 1):
        t, i = ("teacher", "student_init") if k == 1 else (f"teacher_t{k}", f"student_init_t{k}")
        evals[t] = {"perplexity": 255.0}
        evals[i] = {"perplexity": init_ppl + (k - 1)}
        alignment[i] = {"iia": 0.9, "effective_iia": init_eff, "base_agreement": 0.92, "iia_ci95": [0.62, 0.68]}
        alignment[i + "@misaligned"] = {"iia": 0.8, "effective_iia": init_eff / 2}
    evals["student_init@validation"] = {"perplexity": init_ppl + 5}
    evals["random_student"] = {"perplexity": 2500.0}
    alignment["random_student"] = {"iia": 0.001, "effective_iia": 0.0, "base_agreement": 0.001, "iia_ci95": [0, 0]}
    return runs, evals, alignment


def test_verdict_is_three_lines_read_from_effective_iia_with_holm_and_controls():
    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms, teachers=4)
    noise = {1: 0.0, 2: 0.4, 3: -0.3}
    ppl = {"standard": 262.0, "diito": 261.8, "standard_eqc": 262.1, "seed_standard": 357.0}
    eff = {"standard": 0.66, "diito": 0.70, "standard_eqc": 0.66, "seed_standard": 0.51, "ctl_weight": 0.66,
           "ctl_source_kd": 0.69, "ctl_misaligned": 0.68}
    gain = {1: -0.02, 2: 0.02, 3: -0.01, 4: 0.01}  # DIITO's gain over standard, 4 +- 1.8 points by teacher: p 0.02
    runs, evals, alignment = fake_records(
        q, lambda a, s, k: ppl.get(a, 262.0) + noise[s] + k,
        lambda a, s, k: eff.get(a, 0.6) + noise[s] / 100 + (gain[k] if a == "diito" else 0), by_teacher=True)
    r = Results(q, {}, runs, evals, alignment)
    lines = verdict(r).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("1. Distillation: standard distillation against its initialisation, test perplexity "
                               "better (")
    # DIITO 0.2 lower in perplexity: within the spread; +4 effective IIA points over 4 teachers (p about 0.02), but
    # not after Holm over the report's comparisons: nothing is claimed
    assert "at equal steps, perplexity no clear difference" in lines[1]
    assert r.get("diito-standard|effective_iia").unit == "teacher"
    assert r.get("diito-standard|effective_iia").p < 0.05 < r.get("diito-standard|effective_iia").p_holm
    assert "effective IIA no clear difference" in lines[1] and "equal compute" in lines[1]
    assert lines[2].startswith("3. Is the intervention the cause: DIITO beats none of its 3 controls")
    # every main arm and control against the initialisation and DIITO against five arms, two metrics each, + 1
    assert len(r.comparisons) == 7 * 2 + 5 * 2 + 1
    assert all(c.p_holm is not None for c in r.comparisons.values())

    # large, consistent gains over every control: the intervention is said to be the cause
    big = {1: 0.0, 2: 0.001, 3: -0.001}
    runs, evals, alignment = fake_records(q, lambda a, s: ppl.get(a, 262.0) + 10 * big[s],
                                          lambda a, s: (0.9 if a == "diito" else 0.5) + big[s])
    lines = verdict(Results(q, {}, runs, evals, alignment)).splitlines()
    assert "effective IIA DIITO better" in lines[1]
    assert lines[2].startswith("3. Is the intervention the cause: DIITO beats weight-matched")
    assert lines[2].endswith("(all three: the aligned intervention itself helps).")

    # IIA would say otherwise: the verdict reads effective IIA (IIA is 0.9 for every arm here, and 0.9 > 0.65)
    assert "IIA" not in r.get("standard|effective_iia").evidence()
    assert r.vs_init("standard", "effective_iia").diff == pytest.approx(0.66 + 0.001 / 3 - 0.65, abs=1e-9)


def test_one_teacher_makes_no_verdict_so_another_teacher_flips_none():
    """Native kernels (another CPU kind) trained another teacher from the same seed, and 3 of the 10 differences its
    seeds called clear were not clear with it (docs/quickstart.md): with one teacher the report decides nothing, and
    its three lines give that teacher's figures, whose words no test chooses."""
    from pipelines.quickstart import compare as compare_runs
    from pipelines.quickstart.report import diito_table

    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms)
    noise = {1: 0.0, 2: 0.4, 3: -0.3}

    def results(source_kd_lead):  # DIITO's perplexity minus the source-KD control's, on every seed
        ppl = {"standard": 262.0, "diito": 261.8, "ctl_source_kd": 261.8 - source_kd_lead}
        return Results(q, {}, *fake_records(q, lambda a, s: ppl.get(a, 262.0) + noise[s] * (a != "ctl_source_kd"),
                                            lambda a, s: 0.6 + noise[s] / 100))

    clear, unclear = results(9.5), results(0.1)
    name = "diito-ctl_source_kd|perplexity"
    # what the seeds say differs between the two teachers ...
    assert clear.get(name).outcome == "worse" and unclear.get(name).outcome == "no clear difference"
    # ... but neither is a verdict
    assert clear.get(name).result == unclear.get(name).result == "no verdict (one teacher)"
    assert {c.result for c in clear.comparisons.values()} == {"no verdict (one teacher)"}
    lines = verdict(clear).splitlines()
    assert len(lines) == 3 and all("no verdict (one teacher)" in line for line in lines)
    assert lines[0].startswith("1. Distillation: no verdict (one teacher): verdicts are tests over teachers")
    assert f"test perplexity {clear.get('standard|perplexity').interval()}." in lines[0]
    assert ("DIITO minus weight-matched, source-KD, misaligned mapping: perplexity "
            f"{clear.get('diito-ctl_weight|perplexity').interval()}, {clear.get(name).interval()}, ") in lines[2]
    assert "no verdict (one teacher); its seeds: DIITO worse (p = " in diito_table(clear)

    def summary(r):
        return {"verdict": verdict(r), "comparisons": {n: {"result": c.result} for n, c in r.comparisons.items()}}

    moved = compare_runs.compare(summary(clear), summary(unclear))
    assert moved.flipped == [] and moved.verdict_changes == []
    # with five teachers the same figures are tested, and decide
    q5 = fake_quickstart(quickstart_mlm.MlmQuickstart.arms, teachers=5)
    r5 = Results(q5, {}, *fake_records(q5, lambda a, s, k: {"diito": 261.8 + k / 10}.get(a, 262.0) + noise[s],
                                       lambda a, s, k: 0.6, by_teacher=True))
    assert r5.get("diito-standard|perplexity").result == r5.get("diito-standard|perplexity").outcome
    assert not verdict(r5).count("no verdict")


def test_ablation_and_tuning_tables_read_the_validation_part():
    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms)
    runs, evals, alignment = fake_records(q, lambda a, s: {"abl_lm": 340.0, "abl_lm_s0": 258.0}.get(a, 265.0) + s,
                                          lambda a, s: 0.6)
    r = Results(q, {}, runs, evals, alignment)
    table = ablation_table(r)
    lines = table.splitlines()
    assert len(lines) == 2 + len(ablation_rows(q.arms))
    smoothed = next(line for line in lines if line.startswith("| mlm alone |"))
    uniform = next(line for line in lines if line.startswith("| mlm alone, no smoothing |"))
    # against the initialisation's validation perplexity, 281 (its test perplexity is 276)
    assert "(smoothing 0.7)" in smoothed and "| worse (p = " in smoothed and "+61.00" in smoothed
    assert "(smoothing 0)" in uniform and "| better (p = " in uniform and "-21.00" in uniform
    # without the ablation's runs there is no table
    main_only = {n: a for n, a in q.arms.items() if a.main}
    q2 = fake_quickstart(main_only)
    q2.ablation_table_arms = lambda: ablation_rows(q.arms)
    assert ablation_table(Results(q2, {}, *fake_records(q2, lambda a, s: 265.0 + s, lambda a, s: 0.6))) == ""
    # the tuning table marks what was chosen
    arms = {**q.arms, **tuning_arms(q.arms, (1e-4, 5e-4), (0.1, 0.5), 5e-4)}
    q3 = fake_quickstart(arms)
    r3 = Results(q3, {}, *fake_records(q3, lambda a, s: {"tune_lr2": 260.0, "tune_w2": 259.0}.get(a, 270.0) + s,
                                       lambda a, s: 0.6))
    rows = tuning_table(r3, {"lr": 5e-4, "weight": 0.5}).splitlines()[2:]
    assert [row.endswith("| yes |") for row in rows] == [False, True, False, True]


def test_one_standard_error_rule_takes_the_most_preferred_candidate_within_one_error_of_the_best():
    from pipelines.quickstart.stats import one_standard_error
    # the Llama study's weights 0.1, 0.25, 0.5 on the validation part, two seeds: with the pinned kernels the
    # lowest mean was 0.5's, with native ones 0.25's (by 0.05 and 0.005 perplexity): the rule takes 0.25 in both
    pinned = [[79.5425, 79.0406], [79.3242, 78.8933], [79.2309, 78.8806]]
    native = [[81.0196, 80.7225], [80.8488, 80.5961], [80.8471, 80.6063]]
    assert one_standard_error(pinned) == (1, 2)
    assert one_standard_error(native) == (1, 1)
    # the bound is the best's mean plus its standard deviation over sqrt(seeds): here 10 + sqrt(2) / sqrt(2)
    assert one_standard_error([[10.9, 10.9], [9.0, 11.0]]) == (0, 1)
    assert one_standard_error([[11.1, 11.1], [9.0, 11.0]]) == (1, 1)
    # a preferred candidate is chosen before a later one within the bound; one seed: no error, the lowest mean
    assert one_standard_error([[10.5, 10.5], [10.2, 10.2], [9.0, 11.0]]) == (0, 2)
    assert one_standard_error([[10.1], [10.0]]) == (1, 1)


def test_tuning_takes_the_smallest_weight_within_one_error_whatever_order_the_grid_lists():
    from pipelines.quickstart.distill import DistillQuickstart
    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms)
    arms = tuning_arms(q.arms, (1e-3,), (0.5, 0.1, 0.25), 1e-3)
    weights = {k: a for k, a in arms.items() if k.startswith("tune_w")}
    # 0.5 lowest, its seeds 399.5 and 400.5: one error is 0.5; 0.25 within it, 0.1 not
    means = {"tune_w1": 400.0, "tune_w2": 400.9, "tune_w3": 400.3}
    evals = {run_name(k, 1, s): {"perplexity": m + (s - 1.5)} for k, m in means.items() for s in (1, 2)}
    this = SimpleNamespace(seeds=(1, 2))
    assert DistillQuickstart._weight(this, weights, evals) == (0.25, 0.5)
    means["tune_w2"] = 400.4  # 0.1 now within too: the smallest weight
    evals = {run_name(k, 1, s): {"perplexity": m + (s - 1.5)} for k, m in means.items() for s in (1, 2)}
    assert DistillQuickstart._weight(this, weights, evals) == (0.1, 0.5)


def test_the_edge_warning_follows_the_lowest_mean_not_the_rules_choice():
    from pipelines.quickstart.report_text import _edge
    p = SimpleNamespace(tune_lrs=(2.5e-4, 5e-4, 1e-3), tune_weights=(0.1, 0.25, 0.5))
    # the rule took the grid's smallest weight beside an inner lowest mean: nothing suggests going lower
    assert "weight" not in _edge(p, {"lr": 5e-4, "weight": 0.1, "lowest_mean_weight": 0.25})
    assert _edge(p, {"lr": 5e-4, "weight": 0.25, "lowest_mean_weight": 0.25}) == ""
    # the lowest mean at the edge: a larger weight might do better, whichever weight the rule took
    assert "DIITO's weight (0.5, the lowest mean)" in _edge(p, {"lr": 5e-4, "weight": 0.25, "lowest_mean_weight": 0.5})
    assert "DIITO's weight (0.1)" in _edge(p, {"lr": 5e-4, "weight": 0.1, "lowest_mean_weight": 0.1})


def test_two_teachers_pair_each_run_with_its_own_teacher():
    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms, teachers=2)
    runs, evals, alignment = fake_records(q, lambda a, s: 270.0 + s, lambda a, s: 0.6)
    r = Results(q, {}, runs, evals, alignment)
    assert sorted(r.ppl["standard"]) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert sorted(r.ppl["abl_ce"]) == [(1, 1), (1, 2), (1, 3)]  # the ablation runs with the first teacher only
    # each run minus its own teacher's initialisation: 270 + s + (k - 1) - (276 + k - 1) = s - 6
    assert r.vs_init("standard", "perplexity").diff == pytest.approx(-4.0)


def test_both_families_have_the_same_arms_with_their_own_lm_loss():
    bert, clm = quickstart_mlm.MlmQuickstart.arms, quickstart_clm.ClmQuickstart.arms
    assert [n for n, a in bert.items() if a.main] == [n for n, a in clm.items() if a.main] == \
        ["standard", "diito", "standard_eqc", "seed_standard", "ctl_weight", "ctl_source_kd", "ctl_misaligned"]
    # smoothing is an MLM setting; the generalised JSD and on-policy samples are the causal LMs' own rows
    assert set(clm) == set(bert) - {"abl_lm_s0", "abl_seed_combo_s0"} | {"abl_jsd", "abl_on_policy"}
    assert clm["abl_jsd"].alphas == clm["abl_on_policy"].alphas == clm["standard"].alphas
    assert clm["abl_jsd"].lr == clm["abl_on_policy"].lr == clm["standard"].lr  # against the default at its rate
    for arms, lm in ((bert, "mlm"), (clm, "clm")):
        assert arms["seed_standard"].weights(lm) == {"ce": 0.25, "mlm": 0.25 if lm == "mlm" else 0.0,
                                                     "clm": 0.25 if lm == "clm" else 0.0, "cos": 0.25,
                                                     "causal_ce": 0.0}
        assert arms["seed_standard"].lr == "seed" and arms["standard"].lr == "default"
        assert arms["diito"].causal and not arms["standard"].causal
        assert dict(arms["diito"].alphas).items() > dict(arms["standard"].alphas).items()
    assert bert["seed_standard"].smoothing == 0.7 and bert["standard"].smoothing == quickstart_mlm.DEFAULT_SMOOTHING
    assert clm["standard"].smoothing is None
    assert {a.lr for a in bert.values() if not a.main} == {"ablation", "seed"}
    # the test preset's ablation subset names arms that exist (a renamed arm would silently drop out)
    subset = quickstart.PRESETS["test"].ablation_arms
    assert set(subset) <= {n for arms in (bert, clm) for n, a in arms.items() if not a.main}
    assert {"abl_lm", "abl_lm_s0"} <= set(subset) and {"abl_jsd", "abl_on_policy"} <= set(subset)
    assert all(p.ablation_arms is None for name, p in quickstart.PRESETS.items() if name != "test")


def test_controls_differ_from_diito_in_one_thing_each():
    arms = build_arms(True, (("ce", 0.25), ("lm", 0.25)), 0.0, lr=1e-3, weight=0.5)
    diito, std = arms["diito"], arms["standard"]
    assert dict(diito.alphas) == {"ce": 0.25, "lm": 0.25, "causal_ce": 0.5} and diito.lr == std.lr == 1e-3
    # weight-matched: the causal weight moves to ce, the total weight stays DIITO's
    assert dict(arms["ctl_weight"].alphas) == {"ce": 0.75, "lm": 0.25}
    assert sum(dict(arms["ctl_weight"].alphas).values()) == sum(dict(diito.alphas).values())
    # source-KD: standard's objective with --source_kd; misaligned: DIITO's objective with the other mapping
    assert arms["ctl_source_kd"].alphas == std.alphas and arms["ctl_source_kd"].flags == ("--source_kd",)
    assert arms["ctl_misaligned"].alphas == diito.alphas and arms["ctl_misaligned"].mapping == "misaligned"
    assert all(arms[c].lr == diito.lr and arms[c].smoothing == diito.smoothing for c in CONTROLS)
    # the misaligned mapping pairs no student block with the teacher block it was copied from
    assert misaligned_layers([0, 3], 4) == [3, 0] and misaligned_layers([1, 3, 5], 6) == [3, 5, 1]
    assert misaligned_layers([0], 2) == [1] and misaligned_layers([1], 4) == [3]


def test_durations_round_before_splitting_into_minutes():
    # The ablation log once read "1 min 60 s" for 119.6 s: the seconds were rounded after the split.
    assert format_seconds(42.4) == "42 s"
    assert format_seconds(59.7) == "1 min 00 s"
    assert format_seconds(119.6) == "2 min 00 s"
    assert format_seconds(1606.27) == "26 min 46 s"
    assert format_seconds(3599.6) == "1 h 00 min"
    assert format_seconds(4677) == "1 h 17 min"


def test_downstream_accuracy_pairs_each_run_with_its_init_fine_tuned_under_the_same_seed():
    """Each run's accuracy minus its own teacher's initialisation fine-tuned with the run's seed; the comparisons
    join Holm's family, and a task where DIITO gains on every teacher is said in the verdict."""
    from pipelines.quickstart.report import downstream_table

    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms, teachers=5, seeds=(1, 2))
    runs, evals, alignment = fake_records(q, lambda a, s: 270.0 + s, lambda a, s: 0.6)
    # the initialisation's accuracy depends on the fine-tuning seed (0.50 + 0.02 s) and on the teacher
    init = {(k, s): 0.50 + 0.02 * s + 0.001 * k for k in range(1, 6) for s in (1, 2)}
    down = {}
    for k in range(1, 6):
        for s in (1, 2):
            t, i = ("teacher", "student_init") if k == 1 else (f"teacher_t{k}", f"student_init_t{k}")
            down[f"source/{t}_ft{s}"] = {"accuracy": 0.9}
            down[f"source/{i}_ft{s}"] = {"accuracy": init[(k, s)]}
            for arm in MAIN_ARMS:
                gain = 0.10 + 0.001 * k + (0.05 if arm == "diito" else 0.0)
                down[f"source/{run_name(arm, k, s)}_ft{s}"] = {"accuracy": init[(k, s)] + gain}
    for s in (1, 2):
        down[f"source/random_student_ft{s}"] = {"accuracy": 0.3}
    # a second task without room: the teacher fine-tuned is no better than the random student
    for key, rec in list(down.items()):
        down["same_document/" + key.split("/", 1)[1]] = {"accuracy": 0.5 + (0.01 if "_ft2" in key else 0.0)}
    tasks = {"tasks": ["same_document", "source"],
             "balance": {"source": {"test": {"examples": 500, "majority_accuracy": 0.444}}}}
    r = Results(q, {"tasks": tasks}, runs, evals, alignment, down)
    assert r.has_room("source") and not r.has_room("same_document")
    assert not any("same_document" in name for name in r.comparisons)
    assert "same_document" not in verdict(r)
    from pipelines.quickstart.report import downstream_notes
    assert "**no room**" in downstream_notes(r).split("`source`")[0]
    c = r.get("standard|task:source")
    # paired by (teacher, seed): the gain is exactly 0.10 + 0.001 k, whatever the seed did to the initialisation
    assert c.unit == "teacher" and c.n == 5 and c.diff == pytest.approx(0.103)
    assert r.get("diito-standard|task:source").diff == pytest.approx(0.05)
    assert r.get("diito-standard|task:source").p_holm is not None
    assert len(r.comparisons) == 7 * 3 + 5 * 3 + 1
    lines = verdict(r).splitlines()
    assert len(lines) == 3 and "source accuracy better" in lines[0] and "source accuracy DIITO better" in lines[1]
    table = downstream_table(r)
    assert "| teacher (BERT) | 50.5 ± 0.5 | - | 90.0 ± 0.0 | - |" in table
    assert "| DIITO minus standard distillation | - | - | +5.0" in table  # no comparison in a task without room


MAIN_ARMS = [n for n, a in quickstart_mlm.MlmQuickstart.arms.items() if a.main]


def test_diito_table_with_and_without_the_low_resource_arms():
    """A preset without low-resource arms (small) gets no low-resource rows; one with them gets both."""
    from pipelines.quickstart.report import diito_table

    q = fake_quickstart(quickstart_mlm.MlmQuickstart.arms)
    assert q.preset.low_resource is None
    runs, evals, alignment = fake_records(q, lambda a, s: 270.0 + s, lambda a, s: 0.6)
    table = diito_table(Results(q, {}, runs, evals, alignment))
    assert "of the data" not in table and "| standard distillation |" in table
    arms = build_arms(True, quickstart_mlm.DEFAULT_OBJECTIVE, quickstart_mlm.DEFAULT_SMOOTHING, low_resource=0.1)
    q2 = fake_quickstart(arms)
    q2.preset = replace_preset(q2.preset, low_resource=0.1)
    runs, evals, alignment = fake_records(q2, lambda a, s: 270.0 + s - (1.0 if a == "diito_low" else 0.0),
                                          lambda a, s: 0.6)
    r = Results(q2, {}, runs, evals, alignment)
    table = diito_table(r)
    assert "| standard distillation, 0.1 of the data (DIITO with the same data) | -1.00" in table
    assert "(its advantage with 0.1 of the data minus with all of it) | -1.00" in table
    assert r.get("low_vs_full|perplexity").diff == pytest.approx(-1.0)


def test_the_study_leaves_the_seeds_recipe_to_small_and_out_of_holms_family():
    from pipelines.quickstart.report_text import _seed_recipe

    assert quickstart.PRESETS["small"].seed_recipe and not quickstart.PRESETS["study"].seed_recipe
    every = build_arms(True, quickstart_mlm.DEFAULT_OBJECTIVE, quickstart_mlm.DEFAULT_SMOOTHING, low_resource=0.1)
    study = build_arms(True, quickstart_mlm.DEFAULT_OBJECTIVE, quickstart_mlm.DEFAULT_SMOOTHING, low_resource=0.1,
                       seed_recipe=False)
    assert [name for name in every if name != "seed_standard"] == list(study)
    results = {}
    for name, arms in (("every", every), ("study", study)):
        q = fake_quickstart(arms, teachers=5, seeds=(1, 2))
        q.preset = quickstart.PRESETS["study"]
        results[name] = Results(q, {}, *fake_records(q, lambda a, s: 270.0 + s, lambda a, s: 0.6))
    assert set(results["every"].comparisons) - set(results["study"].comparisons) == {
        "seed_standard|perplexity", "seed_standard|effective_iia"}
    assert "the seed's recipe" not in verdict(results["study"])
    p = quickstart.PRESETS["study"]
    assert _seed_recipe(study, "mlm", p) == ""
    assert _seed_recipe(every, "mlm", p) == f" The seed's recipe: `ce 0.25 + mlm 0.25 + cos 0.25 (smoothing 0.7)`, " \
                                          f"learning rate {p.seed_lr:g}."
