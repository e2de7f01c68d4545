"""The quickstart's distillation stages, the same for both families (pipelines/quickstart/mlm.py for BERT,
pipelines/quickstart/clm.py for Llama and GPT-2): the references (teacher, student at initialisation,
random student), the tuning and the ablation (validation part), the main arms and DIITO's controls at
equal steps and equal compute (test part), learning curves, and IIA.

Each training run is evaluated as soon as it finishes (`eval/<run>` on the test part,
`eval_validation/<run>` for tuning and ablation runs), so the terminal shows its perplexity at once
and an interrupted quickstart keeps every finished number. A main run whose command a tuning run
already ran (the first teacher's standard and DIITO runs at the chosen rate and weight) is a copy of
that run, not trained twice. The arms are `arms.build_arms`; the report is `report.write_report`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.quickstart.arms import (NAMES, Arm, ablation_rows, build_arms, init_name, learning_rate,
                                       misaligned_layers, run_name, teacher_name, tuning_arms)
from pipelines.quickstart.downstream import DownstreamStages
from pipelines.quickstart.pipeline import RANDOM_STUDENT_SEED, Quickstart
from pipelines.quickstart.report import write_report
from pipelines.quickstart.stats import one_standard_error
from pipelines.stages import fingerprint, format_seconds
from atomic_files import atomic_write_text


class DistillQuickstart(DownstreamStages, Quickstart):
    """Stages 5 to 10 of both families; a family sets `lm`, `arms`, `student_common`, `data_stage` and `extract_flags`."""

    lm = ""  # the family's LM loss: mlm or clm
    arms: dict[str, Arm] = {}  # the arms before tuning (the preset's student_lr, DIITO_WEIGHT)
    default_objective: tuple = ()
    default_smoothing: float | None = None

    # --- hooks ------------------------------------------------------------------------------------
    def student_common(self, data: dict, k: int) -> list:
        """causal_train.py arguments every run with teacher k shares (not the losses, rate, steps or seed)."""
        raise NotImplementedError

    def arm_argv(self, arm: Arm, k: int) -> list:
        """The arm's own causal_train.py arguments: loss weights, masking smoothing, learning rate, mapping."""
        p = self.preset
        argv = [x for name, w in arm.weights(self.lm).items() for x in (f"--alpha_{name}", w)]
        if arm.smoothing is not None:
            argv += ["--mlm_smoothing", arm.smoothing]
        if arm.causal:
            argv += ["--neuron_mapping", self.out / init_name(k) / f"{'diito' if arm.mapping == 'aligned' else arm.mapping}.nm"]
        return [*argv, *arm.flags, "--learning_rate", learning_rate(arm, p)]

    @property
    def labels(self) -> dict[str, str]:
        return {"teacher": f"teacher ({NAMES[self.family]})", **{n: a.label for n, a in self.arms.items()}}

    @property
    def n_teachers(self) -> int:
        return self.preset.teachers

    # --- stage 5: the student at initialisation, the random student -------------------------------------
    def student_init(self, teacher: dict, extract_flags: tuple[str, ...] = (), k: int = 1) -> dict:
        """Stage 5: the student extracted from teacher k's blocks, its config, DIITO's neuron mapping, and the
        student at initialisation as a model folder (`model/`, evaluated like every trained student)."""
        p = self.preset
        self.banner(5, f"student initialisation: {p.student_layers} of the teacher's {p.teacher_layers} blocks "
                       f"({self.extract_script}{''.join(' ' + f for f in self.extract_title_flags())}), "
                       f"config, DIITO mapping and the untrained student" + (f" (teacher {k})" if k > 1 else ""))
        settings = {"teacher": teacher["key"], "student_layers": p.student_layers, **self.family_settings(),
                    "init_model": 2}

        def work(folder: Path) -> dict:
            weights = folder / "student_init.pth"
            self.pipe.command(f"extract{'' if k == 1 else f'_t{k}'}", self.extract_script, [
                "--model_type", self.family, "--model_name", self.out / teacher_name(k), "--dump_checkpoint", weights,
                "--num_layers", p.student_layers, *extract_flags])
            record = json.loads(weights.with_name(weights.name + ".json").read_text())
            atomic_write_text(folder / "student_config.json", self.student_config_text(record))
            atomic_write_text(folder / "diito.nm", json.dumps(neuron_mapping(record["teacher_layers"], p.heads,
                                                                             p.hidden // p.heads), indent=2) + "\n")
            wrong = misaligned_layers(record["teacher_layers"], p.teacher_layers)
            atomic_write_text(folder / "misaligned.nm", json.dumps(neuron_mapping(wrong, p.heads, p.hidden // p.heads),
                                                                   indent=2) + "\n")
            save_student(self.student_type, folder / "student_config.json", weights, folder / "model")
            print(f"  student block i <- teacher block {record['teacher_layers']}; DIITO aligns the outputs of "
                  f"each pair, full width ({folder / 'diito.nm'})", flush=True)
            return {"teacher_layers": record["teacher_layers"], "misaligned_layers": wrong}

        return self.pipe.unit(init_name(k), self.out / init_name(k), settings, work,
                              ("student_init.pth", "student_config.json", "diito.nm", "misaligned.nm",
                               "model/model.safetensors"))

    def random_student(self, init: dict) -> dict:
        """Stage 5: a student of the same shape at random (initialised as causal_train.py would without
        --student_pretrained_weights, seed RANDOM_STUDENT_SEED): the floor every row is read against."""
        settings = {"init": init["key"], "seed": RANDOM_STUDENT_SEED}

        def work(folder: Path) -> dict:
            save_student(self.student_type, self.out / "student_init" / "student_config.json", None, folder,
                         seed=RANDOM_STUDENT_SEED)
            print(f"  random student (seed {RANDOM_STUDENT_SEED}): {folder}", flush=True)
            return {}

        return self.pipe.unit("random_student", self.out / "random_student", settings, work,
                              ("model.safetensors", "config.json"))

    def extract_title_flags(self) -> tuple[str, ...]:
        return ()

    # --- stage 5: references ------------------------------------------------------------------------
    def references(self, teachers: dict[int, dict], extract_flags: tuple[str, ...] = (),
                   made: dict | None = None) -> tuple[dict, dict]:
        """Each teacher's extracted student (those in `made` already made), the random student, and their held-out
        perplexity with the teachers'. Returns (stage records by name, evaluation records by name)."""
        stages, evals = {}, {}
        for k, teacher in teachers.items():
            stages[init_name(k)] = (made or {}).get(init_name(k)) or self.student_init(teacher, extract_flags, k)
        stages["random_student"] = self.random_student(stages["student_init"])
        models = {teacher_name(k): (self.out / teacher_name(k), teacher) for k, teacher in teachers.items()}
        models.update({init_name(k): (self.out / init_name(k) / "model", stages[init_name(k)]) for k in teachers})
        models["random_student"] = (self.out / "random_student", stages["random_student"])
        jobs = [(n, m, "test") for n, m in models.items()] + [(init_name(1), models[init_name(1)], "validation")]
        done = self.pipe.parallel([lambda n=n, m=m, s=s: self.evaluate_one(n, *m, split=s) for n, m, s in jobs])
        evals.update(zip(models, done))
        evals[f"{init_name(1)}@validation"] = done[-1]
        return stages, evals

    # --- stages 6 and 7: training runs ----------------------------------------------------------------
    def curve_interval(self, steps: int) -> int:
        """--snapshot_interval of a first-teacher run of `steps` steps: `curve_points` evaluations along it."""
        return max(1, steps // self.preset.curve_points)

    def train_and_evaluate(self, runs: list[tuple[Arm, int, int]], steps_of, data: dict, inits: dict,
                           split: str = "test", curves: bool = True) -> tuple:
        """Train each (arm, teacher, seed) run, then evaluate it on `split`. The first teacher's runs save snapshots
        for the learning curves (with `curves`). A run whose command ran already (`self.trained`) is not trained
        again. Returns (run records, evaluation records); a run's record names its model folder."""
        def one(i: int, arm: Arm, k: int, seed: int) -> tuple[dict, dict]:
            name = run_name(arm.name, k, seed)
            n = steps_of(arm)
            argv = [*self.student_common(data, k), *self.arm_argv(arm, k), "--max_steps", n,
                    "--log_interval", max(1, n // 25), "--seed", seed,
                    *(["--snapshot_interval", self.curve_interval(n)] if curves and k == 1 else [])]
            settings = {"data": data["key"], "init": inits[init_name(k)]["key"], "argv": [str(a) for a in argv]}
            key = fingerprint(settings)
            about = {"objective": arm.name, "teacher": k, "seed": seed, "steps": n}
            if key in self.trained:  # the same command gives the same model, bit for bit: copied, not trained
                same, first = self.trained[key]
                record = self.pipe.unit(name, self.out / "students" / name, {**settings, "same_as": same},
                                        lambda folder: copy_run(self.out / "students" / same, folder, first, about),
                                        ("model.safetensors", "config.json"))
                record = {**record, "folder": str(self.out / "students" / name)}
            else:
                record = self.student(
                    name, argv, settings, about,
                    done_line=lambda seconds: (
                        f"  run {i}/{len(runs)}: {arm.label}, " + (f"teacher {k}, " if self.n_teachers > 1 else "")
                        + f"seed {seed}, {n} steps: {format_seconds(seconds)}"))
                record = {**record, "folder": str(self.out / "students" / name)}
                self.trained[key] = (name, record)
            return record, self.evaluate_one(name, Path(record["folder"]), record, split=split)

        done = self.pipe.parallel([lambda i=i, r=r: one(i, *r) for i, r in enumerate(runs, 1)])
        names = [run_name(arm.name, k, seed) for arm, k, seed in runs]
        return ({n: d[0] for n, d in zip(names, done)}, {n: d[1] for n, d in zip(names, done)})

    def tuning(self, data: dict, inits: dict) -> tuple[dict, dict, dict]:
        """Stage 6: choose the standard objective's learning rate, then DIITO's weight at it, each by the mean
        validation perplexity over the seeds (first teacher), with the same number of tries; then the ablation.
        Returns (the choice, run records, evaluation records)."""
        p = self.preset
        steps = self.args.steps or p.student_steps
        if self.args.no_tuning:
            self.banner(6, f"tuning: not run (--no_tuning): learning rate {p.student_lr:g}, DIITO's weight "
                           f"{dict(self.arms['diito'].alphas)['causal_ce']:g}")
            choice = {"lr": p.student_lr, "weight": dict(self.arms["diito"].alphas)["causal_ce"], "tuned": False}
            runs, evals = {}, {}
        else:
            self.banner(6, f"tuning on the validation part: learning rate of standard distillation "
                           f"({', '.join(f'{r:g}' for r in p.tune_lrs)}), then DIITO's weight "
                           f"({', '.join(f'{w:g}' for w in p.tune_weights)}) at it; {steps} steps, seeds "
                           f"{', '.join(map(str, self.seeds))}")
            rates = tuning_arms(self.arms, p.tune_lrs)
            runs, evals = self.train_and_evaluate([(a, 1, s) for a in rates.values() for s in self.seeds],
                                                  lambda arm: steps, data, inits, split="validation")
            lr = p.tune_lrs[self._best(rates, evals)]
            weights = {k: a for k, a in tuning_arms(self.arms, p.tune_lrs, p.tune_weights, lr).items() if k not in rates}
            more_runs, more = self.train_and_evaluate([(a, 1, s) for a in weights.values() for s in self.seeds],
                                                      lambda arm: steps, data, inits, split="validation")
            runs.update(more_runs)
            evals.update(more)
            weight, lowest = self._weight(weights, evals)
            choice = {"lr": lr, "weight": weight, "lowest_mean_weight": lowest, "tuned": True,
                      "arms": {**rates, **weights}}
            print(f"  chosen on the validation part: learning rate {lr:g}, DIITO's weight {weight:g}"
                  + ("" if lowest == weight else f" (the lowest mean at {lowest:g}; {weight:g} is within one "
                                                 f"standard error of it)"), flush=True)
        abl_runs, abl_evals = self.ablation(data, inits)
        return choice, {**runs, **abl_runs}, {**evals, **abl_evals}

    def _best(self, arms: dict[str, Arm], evals: dict) -> int:
        """The index of the arm with the lowest mean validation perplexity over the seeds (the first on a tie)."""
        means = [sum(evals[run_name(name, 1, s)]["perplexity"] for s in self.seeds) / len(self.seeds) for name in arms]
        return means.index(min(means))

    def _weight(self, arms: dict[str, Arm], evals: dict) -> tuple[float, float]:
        """DIITO's weight by the one-standard-error rule: the smallest weight whose mean validation perplexity is
        within one standard error of the lowest mean (the smallest departs least from standard distillation; the
        weights' perplexities tend to differ by less than their spread over seeds, and then the lowest mean is a
        draw). Returns (the weight chosen, the weight with the lowest mean)."""
        weights = [dict(arm.alphas)["causal_ce"] for arm in arms.values()]
        order = sorted(range(len(weights)), key=weights.__getitem__)
        names = list(arms)
        scores = [[evals[run_name(names[j], 1, s)]["perplexity"] for s in self.seeds] for j in order]
        chosen, lowest = one_standard_error(scores)
        return weights[order[chosen]], weights[order[lowest]]

    def ablation(self, data: dict, inits: dict) -> tuple[dict, dict]:
        """Stage 6: the ablation arms (first teacher, every seed), read on the validation part."""
        p = self.preset
        steps = self.args.steps or p.student_steps
        arms = [a for a in self.arms.values() if not a.main
                and (p.ablation_arms is None or a.name in p.ablation_arms)]
        if not p.ablation or self.args.no_ablation:
            print("  ablation: not run (" + ("--no_ablation" if self.args.no_ablation else
                                            f"preset {self.args.preset}") + ")", flush=True)
            return {}, {}
        runs = [(arm, 1, seed) for arm in arms for seed in self.seeds]
        print(f"  ablation on the validation part: {len(arms)} objectives ({', '.join(a.label for a in arms)}), "
              f"{steps} steps ({len(runs)} runs)", flush=True)
        return self.train_and_evaluate(runs, lambda arm: steps, data, inits, split="validation", curves=False)

    def count_flops(self, data: dict, inits: dict, steps: int) -> dict:
        """FLOPs per step of every main arm, counted on the first seed's first batches (shapes only)."""
        argv_of = {name: [*self.student_common(data, 1), *self.arm_argv(arm, 1)]
                   for name, arm in self.arms.items() if arm.main and not arm.equal_compute}

        def count(folder: Path) -> dict:
            result = {}
            for objective, argv in argv_of.items():
                self.pipe.command(f"flops_{objective}", "scripts/count_step_flops.py", [
                    "--out", folder / f"{objective}.json", "--batches", 4, "--",
                    *argv, "--max_steps", steps, "--seed", self.seeds[0], "--no_progress"])
                result[objective] = json.loads((folder / f"{objective}.json").read_text())["flops_per_step"]
            result["standard_eqc"] = result["standard"]
            result["ratio"] = result["diito"] / result["standard"]
            print(f"  FLOPs per step: standard {result['standard'] / 1e9:.3g} G, DIITO {result['diito'] / 1e9:.3g} G "
                  f"(ratio {result['ratio']:.2f})", flush=True)
            return result

        settings = {"data": data["key"], "init": inits["student_init"]["key"], "steps": steps,
                    "argv": {k: [str(a) for a in v] for k, v in argv_of.items()}}
        return self.pipe.unit("flops", self.out / "flops", settings, count, tuple(f"{k}.json" for k in argv_of))

    def students(self, data: dict, inits: dict) -> tuple[dict, dict, dict]:
        """Stage 7: the main arms and DIITO's controls per teacher and seed (standard at DIITO's compute gets the steps
        of the FLOPs ratio), each evaluated on the test part; the first teacher's at several points too."""
        steps = self.args.steps or self.preset.student_steps
        arms = [a for a in self.arms.values() if a.main]
        runs = [(arm, k, seed) for arm in arms for k in range(1, self.n_teachers + 1) for seed in self.seeds]
        teachers = f", teachers 1 to {self.n_teachers}" if self.n_teachers > 1 else ""
        self.banner(7, f"students: causal_train.py, {', '.join(a.label for a in arms)}; {steps} steps (the "
                       f"equal-compute arm: by counted FLOPs), seeds {', '.join(map(str, self.seeds))}{teachers} "
                       f"({len(runs)} runs, each evaluated on the test part)")
        flops = self.count_flops(data, inits, steps)
        eqc = max(1, round(steps * flops["ratio"]))
        records, evals = self.train_and_evaluate(runs, lambda arm: eqc if arm.equal_compute else steps, data, inits)
        curve_models = {f"{name}_step{step}": (folder, {"key": f"{rec['key']}@{step}"})
                        for name, rec in records.items() if rec["teacher"] == 1
                        for step, folder in snapshots(Path(rec["folder"]), rec["steps"])}
        done = self.pipe.parallel([lambda n=n, m=m: self.evaluate_one(n, *m) for n, m in curve_models.items()])
        evals.update(zip(curve_models, done))
        return flops, records, evals

    # --- stage 8: IIA -------------------------------------------------------------------------------
    def iia_common(self, k: int, mapping: str = "diito") -> list:
        p = self.preset
        return [
            "--teacher_name", self.out / teacher_name(k), "--tokenizer_name", self.out / "tokenizer",
            "--neuron_mapping", self.out / init_name(k) / f"{mapping}.nm",
            "--data_file", self.out / "corpus" / "test.txt", "--max_seq_length", p.max_seq_length,
            "--num_pairs", p.iia_pairs, "--seed", 0, "--batch_size", 64,
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            *(["--device", "cuda", "--bf16"] if p.gpu else ["--device", "cpu"]),
        ]

    def alignment(self, teachers: dict, refs: dict, students: dict[str, dict]) -> dict[str, dict]:
        """Stage 8: IIA with DIITO's mapping of the student at initialisation, the random student, every main run
        and the first teacher's snapshots; at the misaligned sites (which DIITO did not train on) for the
        initialisations and the standard, DIITO and misaligned-control runs; every block pair (--sweep) for the
        initialisation and the first seed's standard and DIITO students."""
        p = self.preset
        models = {init_name(k): (self.out / init_name(k) / "model", refs[init_name(k)], k) for k in teachers}
        models["random_student"] = (self.out / "random_student", refs["random_student"], 1)
        models.update({name: (Path(rec["folder"]), rec, rec["teacher"]) for name, rec in students.items()})
        jobs = [(name, m, "diito") for name, m in models.items()]
        jobs += [(f"{name}_step{step}", (folder, {"key": f"{rec['key']}@{step}"}, 1), "diito")
                 for name, rec in students.items() if rec["teacher"] == 1
                 for step, folder in snapshots(Path(rec["folder"]), rec["steps"])]
        jobs += [(name, m, "misaligned") for name, m in models.items()
                 if name.startswith("student_init") or students.get(name, {}).get("objective")
                 in ("standard", "diito", "ctl_misaligned")]
        first = {run_name(a, 1, self.seeds[0]) for a in ("standard", "diito")} | {"student_init"}
        self.banner(8, f"alignment: IIA of {len(models)} models with their teacher and of the first teacher's "
                       f"snapshots (run_iia.py, {p.iia_pairs} test pairs; DIITO's mapping, and the misaligned one "
                       f"DIITO did not train on; every block pair for {', '.join(sorted(first))})")

        def one(name: str, folder_in: Path, rec: dict, k: int, mapping: str) -> dict:
            argv = ["--student_name", folder_in, *self.iia_common(k, mapping),
                    *(["--sweep"] if name in first and mapping == "diito" else [])]
            settings = {"model": rec["key"], "teacher": self.teacher_keys[k], "argv": [str(a) for a in argv]}
            tag = "" if mapping == "diito" else f"_{mapping}"

            def work(folder: Path, argv=argv, name=name) -> dict:
                self.pipe.command(f"iia{tag}_{name}", "run_iia.py", [*argv, "--output_dir", folder])
                found = json.loads((folder / "iia_results.json").read_text())["mapping"]
                overall = found["overall"]
                print(f"  {name}{tag}: IIA {100 * overall['iia']['value']:.1f}%, effective IIA "
                      f"{100 * (overall['effective_iia']['value'] or 0):.1f}%, base agreement "
                      f"{100 * found['base_agreement']['value']:.1f}%", flush=True)
                return {"iia": overall["iia"]["value"], "iia_ci95": overall["iia"]["ci95"],
                        "effective_iia": overall["effective_iia"]["value"],
                        "base_agreement": found["base_agreement"]["value"]}

            return self.pipe.unit(f"iia{tag} {name}", self.out / f"iia{tag}" / name, settings, work,
                                  ("iia_results.json",))

        self.teacher_keys = {k: t["key"] for k, t in teachers.items()}
        done = self.pipe.parallel([lambda n=n, m=m, g=g: one(n, *m, g) for n, m, g in jobs])
        return {(n if g == "diito" else f"{n}@{g}"): d for (n, _, g), d in zip(jobs, done)}

    # --- stage 10: report ---------------------------------------------------------------------------
    def report(self, stages: dict, runs: dict, evals: dict, alignment: dict, downstream: dict) -> dict:
        self.banner(10, "report: verdict, tables, curves and plots")
        settings = self.report_settings(14, stages={k: v for k, v in stages.items() if "key" in v}, runs=runs,
                                        evals=evals, alignment=alignment, downstream=downstream)
        settings["choice"] = {k: v for k, v in stages["tuning"].items() if k != "arms"}

        def work(folder: Path) -> dict:
            summary = write_report(self, stages, runs, evals, alignment, downstream)
            print(f"  {self.out / 'report.md'}", flush=True)
            return {"verdict": summary["verdict"]}

        return self.pipe.unit("report", self.out / "plots", settings, work,
                              ("heldout_perplexity.png", "training_losses.png", "iia_heatmaps.png", "curves.png",
                               "../report.md", "../summary.json"))

    def run_stages(self) -> dict:
        self.trained = {}
        stages = {}
        stages["corpus"] = corpus = self.corpus()
        tasks = self.tasks(corpus)
        if tasks is not None:
            stages["tasks"] = tasks
        stages["tokenizer"] = tokenizer = self.tokenizer(corpus)
        ks = list(range(1, self.n_teachers + 1))
        with self.pipe.started([lambda k=k: self.teacher(corpus, tokenizer, k) for k in ks]) as pending:
            # the tuning needs only the first teacher: its runs take the core that five teachers on two cores
            # would leave idle while the fifth trains alone
            data = self.data_stage(corpus, tokenizer)
            first = {init_name(1): self.student_init(pending[0].result(), self.extract_flags(), 1)}
            choice, runs, tuning_evals = self.tuning(data, first)
            teachers = dict(zip(ks, (f.result() for f in pending)))
        stages.update({teacher_name(k): t for k, t in teachers.items()})
        stages["data"] = data
        refs, evals = self.references(teachers, self.extract_flags(), first)
        stages.update(refs)
        evals.update(tuning_evals)
        self.arms = {**build_arms(self.lm == "mlm", self.default_objective, self.default_smoothing,
                                  lr=choice["lr"], weight=choice["weight"], low_resource=self.preset.low_resource,
                                  seed_recipe=self.preset.seed_recipe),
                     **choice.get("arms", {})}
        stages["tuning"] = choice
        stages["flops"], main_runs, more = self.students(data, refs)
        runs.update(main_runs)
        evals.update(more)
        alignment = self.alignment(teachers, refs, main_runs)
        downstream = self.downstream(tasks, self.downstream_models(teachers, refs, main_runs))
        return self.report(stages, runs, evals, alignment, downstream)

    def downstream_models(self, teachers: dict, refs: dict, runs: dict) -> dict:
        """The models stage 9 fine-tunes: the teachers, initialisations and random student once per seed, each main
        run with its own seed."""
        seeds = list(self.seeds)[:self.preset.downstream_seeds]
        models = {teacher_name(k): (self.out / teacher_name(k), t, seeds) for k, t in teachers.items()}
        models.update({init_name(k): (self.out / init_name(k) / "model", refs[init_name(k)], seeds) for k in teachers})
        models["random_student"] = (self.out / "random_student", refs["random_student"], seeds)
        models.update({name: (Path(rec["folder"]), rec, [rec["seed"]]) for name, rec in runs.items()
                       if rec["seed"] in seeds})
        return models

    def data_stage(self, corpus: dict, tokenizer: dict) -> dict:
        raise NotImplementedError

    def extract_flags(self) -> tuple[str, ...]:
        return ()

    def ablation_table_arms(self) -> list[str]:
        return ablation_rows(self.arms)


def copy_run(source: Path, folder: Path, record: dict, about: dict) -> dict:
    """Copy the training run in `source` (its student, snapshots and logs) into `folder`: the run of another name
    whose command it is. Its record says so (`same_as`); its training time is the source's, counted once."""
    import shutil

    for entry in sorted(source.iterdir()):
        if entry.name != ".done":
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, folder / entry.name)
    print(f"  {folder.name}: the same command as {source.name}, copied", flush=True)
    return {"train_seconds": record["train_seconds"], **about, "same_as": source.name}


def snapshots(folder: Path, steps: int) -> list[tuple[int, Path]]:
    """(step, folder) of each snapshot of a run (--snapshot_interval) before its last step, in order."""
    found = [(int(p.name.split("_")[1]), p) for p in (folder / "snapshots").glob("step_*")]
    return sorted((step, p) for step, p in found if step < steps)


def neuron_mapping(teacher_layers: list[int], heads: int, head_dim: int) -> dict:
    """A DIITO mapping that aligns the output of student block i with that of the teacher block copied into it."""
    width = f"$H:[0:{heads}]$[0:{head_dim}]"
    return {"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:{t}{width}"], "student_variable_names": [f"$L:{i}{width}"]}
        for i, t in enumerate(teacher_layers)
    ]}


def save_student(student_type: str, config: Path, weights: Path | None, folder: Path, seed: int = 0) -> None:
    """Save a student model folder as causal_train.py builds it at step 0: from the extracted `weights`, or at
    random (seeded) without them."""
    import logging
    from argparse import Namespace

    import torch
    from transformers.utils import logging as hf_logging

    from distill_setup import build_student

    quiet = logging.getLogger("causal_distill")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the terminal shows stage lines only
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_student(Namespace(student_type=student_type, student_config=str(config),
                                            student_pretrained_weights=str(weights) if weights else None,
                                            initializer_range=0.02))
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        quiet.setLevel(level)
        hf_logging.enable_progress_bar()
