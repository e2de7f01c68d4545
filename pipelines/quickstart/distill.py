"""The quickstart's distillation stages, the same for both families (pipelines/quickstart/mlm.py for BERT,
pipelines/quickstart/clm.py for Llama and GPT-2): the references (teacher, student at initialisation,
random student), the ablation, the main arms at equal steps and equal compute, and IIA.

Each training run is evaluated on the held-out part as soon as it finishes (`eval/<run>`), so the
terminal shows its perplexity at once and an interrupted quickstart keeps every finished number.
The arms are `arms.build_arms`; the report is `report.write_report`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.quickstart.arms import NAMES, Arm, ablation_rows, init_name, learning_rate, run_name, teacher_name
from pipelines.quickstart.pipeline import RANDOM_STUDENT_SEED, Quickstart
from pipelines.quickstart.report import write_report
from pipelines.stages import format_seconds
from atomic_files import atomic_write_text


class DistillQuickstart(Quickstart):
    """Stages 5 to 9 of both families; a family sets `lm`, `arms`, `student_common`, `data_stage` and `extract_flags`."""

    lm = ""  # the family's LM loss: mlm or clm
    arms: dict[str, Arm] = {}

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
            argv += ["--neuron_mapping", self.out / init_name(k) / "diito.nm"]
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
                    "init_model": 1}

        def work(folder: Path) -> dict:
            weights = folder / "student_init.pth"
            self.pipe.command(f"extract{'' if k == 1 else f'_t{k}'}", self.extract_script, [
                "--model_type", self.family, "--model_name", self.out / teacher_name(k), "--dump_checkpoint", weights,
                "--num_layers", p.student_layers, *extract_flags])
            record = json.loads(weights.with_name(weights.name + ".json").read_text())
            atomic_write_text(folder / "student_config.json", self.student_config_text(record))
            atomic_write_text(folder / "diito.nm", json.dumps(neuron_mapping(record["teacher_layers"], p.heads,
                                                                             p.hidden // p.heads), indent=2) + "\n")
            save_student(self.student_type, folder / "student_config.json", weights, folder / "model")
            print(f"  student block i <- teacher block {record['teacher_layers']}; DIITO aligns the outputs of "
                  f"each pair, full width ({folder / 'diito.nm'})", flush=True)
            return {"teacher_layers": record["teacher_layers"]}

        return self.pipe.unit(init_name(k), self.out / init_name(k), settings, work,
                              ("student_init.pth", "student_config.json", "diito.nm", "model/model.safetensors"))

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
    def references(self, teachers: dict[int, dict], extract_flags: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """Each teacher's extracted student, the random student, and their held-out perplexity with the teachers'.
        Returns (stage records by name, evaluation records by name)."""
        stages, evals = {}, {}
        for k, teacher in teachers.items():
            stages[init_name(k)] = self.student_init(teacher, extract_flags, k)
        stages["random_student"] = self.random_student(stages["student_init"])
        models = {teacher_name(k): (self.out / teacher_name(k), teacher) for k, teacher in teachers.items()}
        models.update({init_name(k): (self.out / init_name(k) / "model", stages[init_name(k)]) for k in teachers})
        models["random_student"] = (self.out / "random_student", stages["random_student"])
        done = self.pipe.parallel([lambda n=n, m=m: self.evaluate_one(n, *m) for n, m in models.items()])
        evals.update(zip(models, done))
        return stages, evals

    # --- stages 6 and 7: training runs ----------------------------------------------------------------
    def train_and_evaluate(self, runs: list[tuple[Arm, int, int]], steps_of, data: dict, inits: dict) -> tuple:
        """Train each (arm, teacher, seed) run, then evaluate it. Returns (run records, evaluation records)."""
        def one(i: int, arm: Arm, k: int, seed: int) -> tuple[dict, dict]:
            name = run_name(arm.name, k, seed)
            n = steps_of(arm)
            argv = [*self.student_common(data, k), *self.arm_argv(arm, k), "--max_steps", n,
                    "--log_interval", max(1, n // 25), "--seed", seed]
            settings = {"data": data["key"], "init": inits[init_name(k)]["key"], "argv": [str(a) for a in argv]}
            record = self.student(
                name, argv, settings, {"objective": arm.name, "teacher": k, "seed": seed, "steps": n},
                done_line=lambda seconds: (
                    f"  run {i}/{len(runs)}: {arm.label}, " + (f"teacher {k}, " if self.n_teachers > 1 else "")
                    + f"seed {seed}, {n} steps: {format_seconds(seconds)}"))
            return record, self.evaluate_one(name, self.out / "students" / name, record)

        done = self.pipe.parallel([lambda i=i, r=r: one(i, *r) for i, r in enumerate(runs, 1)])
        names = [run_name(arm.name, k, seed) for arm, k, seed in runs]
        return ({n: d[0] for n, d in zip(names, done)}, {n: d[1] for n, d in zip(names, done)})

    def ablation(self, data: dict, inits: dict) -> tuple[dict, dict]:
        """Stage 6: the ablation arms (first teacher, every seed); the main arms it lists run in stage 7."""
        p = self.preset
        steps = self.args.steps or p.student_steps
        arms = [a for a in self.arms.values() if not a.main
                and (p.ablation_arms is None or a.name in p.ablation_arms)]
        if not p.ablation or self.args.no_ablation:
            self.banner(6, "ablation: not run (" + ("--no_ablation" if self.args.no_ablation else
                                                    f"preset {self.args.preset}") + ")")
            return {}, {}
        runs = [(arm, 1, seed) for arm in arms for seed in self.seeds]
        self.banner(6, f"ablation: {len(arms)} objectives besides the main arms ({', '.join(a.label for a in arms)}), "
                       f"{steps} steps, seeds {', '.join(map(str, self.seeds))} ({len(runs)} runs, each evaluated)")
        return self.train_and_evaluate(runs, lambda arm: steps, data, inits)

    def count_flops(self, data: dict, inits: dict, steps: int) -> dict:
        """FLOPs per step of the standard and DIITO arms, counted on the first seed's first batches (shapes only)."""
        argv_of = {name: [*self.student_common(data, 1), *self.arm_argv(self.arms[name], 1)]
                   for name in ("standard", "diito")}

        def count(folder: Path) -> dict:
            result = {}
            for objective, argv in argv_of.items():
                self.pipe.command(f"flops_{objective}", "scripts/count_step_flops.py", [
                    "--out", folder / f"{objective}.json", "--batches", 4, "--",
                    *argv, "--max_steps", steps, "--seed", self.seeds[0], "--no_progress"])
                result[objective] = json.loads((folder / f"{objective}.json").read_text())["flops_per_step"]
            result["ratio"] = result["diito"] / result["standard"]
            print(f"  FLOPs per step: standard {result['standard'] / 1e9:.3g} G, DIITO {result['diito'] / 1e9:.3g} G "
                  f"(ratio {result['ratio']:.2f})", flush=True)
            return result

        settings = {"data": data["key"], "init": inits["student_init"]["key"], "steps": steps,
                    "argv": {k: [str(a) for a in v] for k, v in argv_of.items()}}
        return self.pipe.unit("flops", self.out / "flops", settings, count, ("standard.json", "diito.json"))

    def students(self, data: dict, inits: dict) -> tuple[dict, dict, dict]:
        """Stage 7: the main arms per teacher and seed; standard at DIITO's compute gets the steps of the FLOPs ratio."""
        steps = self.args.steps or self.preset.student_steps
        arms = [a for a in self.arms.values() if a.main]
        runs = [(arm, k, seed) for arm in arms for k in range(1, self.n_teachers + 1) for seed in self.seeds]
        teachers = f", teachers 1 to {self.n_teachers}" if self.n_teachers > 1 else ""
        self.banner(7, f"students: causal_train.py, {', '.join(a.label for a in arms)}; {steps} steps (the "
                       f"equal-compute arm: by counted FLOPs), seeds {', '.join(map(str, self.seeds))}{teachers} "
                       f"({len(runs)} runs, each evaluated)")
        flops = self.count_flops(data, inits, steps)
        eqc = max(1, round(steps * flops["ratio"]))
        records, evals = self.train_and_evaluate(runs, lambda arm: eqc if arm.equal_compute else steps, data, inits)
        return flops, records, evals

    # --- stage 8: IIA -------------------------------------------------------------------------------
    def iia_common(self, k: int) -> list:
        p = self.preset
        return [
            "--teacher_name", self.out / teacher_name(k), "--tokenizer_name", self.out / "tokenizer",
            "--neuron_mapping", self.out / init_name(k) / "diito.nm",
            "--data_file", self.out / "corpus" / "heldout.txt", "--max_seq_length", p.max_seq_length,
            "--num_pairs", p.iia_pairs, "--seed", 0, "--batch_size", 64,
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            *(["--device", "cuda", "--bf16"] if p.gpu else ["--device", "cpu"]),
        ]

    def alignment(self, teachers: dict, refs: dict, students: dict[str, dict]) -> dict[str, dict]:
        """Stage 8: IIA with DIITO's mapping of the student at initialisation, the random student and every main
        run; every block pair (--sweep) for the initialisation and the first seed's standard and DIITO students."""
        p = self.preset
        models = {init_name(k): (self.out / init_name(k) / "model", refs[init_name(k)], k) for k in teachers}
        models["random_student"] = (self.out / "random_student", refs["random_student"], 1)
        models.update({name: (self.out / "students" / name, rec, rec["teacher"]) for name, rec in students.items()})
        first = {run_name(a, 1, self.seeds[0]) for a in ("standard", "diito")} | {"student_init"}
        self.banner(8, f"alignment: IIA of {len(models)} models with their teacher (run_iia.py, DIITO's mapping, "
                       f"{p.iia_pairs} held-out pairs; every block pair for {', '.join(sorted(first))})")

        def one(name: str, folder_in: Path, rec: dict, k: int) -> dict:
            argv = ["--student_name", folder_in, *self.iia_common(k), *(["--sweep"] if name in first else [])]
            settings = {"model": rec["key"], "teacher": teachers[k]["key"], "argv": [str(a) for a in argv]}

            def work(folder: Path, argv=argv, name=name) -> dict:
                self.pipe.command(f"iia_{name}", "run_iia.py", [*argv, "--output_dir", folder])
                mapping = json.loads((folder / "iia_results.json").read_text())["mapping"]
                overall = mapping["overall"]
                print(f"  {name}: IIA {100 * overall['iia']['value']:.1f}%, effective IIA "
                      f"{100 * (overall['effective_iia']['value'] or 0):.1f}%, base agreement "
                      f"{100 * mapping['base_agreement']['value']:.1f}%", flush=True)
                return {"iia": overall["iia"]["value"], "iia_ci95": overall["iia"]["ci95"],
                        "effective_iia": overall["effective_iia"]["value"],
                        "base_agreement": mapping["base_agreement"]["value"]}

            return self.pipe.unit(f"iia {name}", self.out / "iia" / name, settings, work, ("iia_results.json",))

        done = self.pipe.parallel([lambda n=n, m=m: one(n, *m) for n, m in models.items()])
        return dict(zip(models, done))

    # --- stage 9: report ----------------------------------------------------------------------------
    def report(self, stages: dict, runs: dict, evals: dict, alignment: dict) -> dict:
        self.banner(9, "report: tables, verdict and plots")
        settings = self.report_settings(7, stages=stages, runs=runs, evals=evals, alignment=alignment)

        def work(folder: Path) -> dict:
            summary = write_report(self, stages, runs, evals, alignment)
            print(f"  {self.out / 'report.md'}", flush=True)
            return {"verdict": summary["verdict"]}

        return self.pipe.unit("report", self.out / "plots", settings, work,
                              ("heldout_perplexity.png", "training_losses.png", "iia_heatmaps.png", "ablation.png",
                               "../report.md", "../summary.json"))

    def run_stages(self) -> dict:
        stages = {}
        stages["corpus"] = corpus = self.corpus()
        stages["tokenizer"] = tokenizer = self.tokenizer(corpus)
        ks = list(range(1, self.n_teachers + 1))
        teachers = dict(zip(ks, self.pipe.parallel([lambda k=k: self.teacher(corpus, tokenizer, k) for k in ks])))
        stages.update({teacher_name(k): t for k, t in teachers.items()})
        stages["data"] = data = self.data_stage(corpus, tokenizer)
        refs, evals = self.references(teachers, self.extract_flags())
        stages.update(refs)
        runs, more = self.ablation(data, refs)
        evals.update(more)
        stages["flops"], main_runs, more = self.students(data, refs)
        runs.update(main_runs)
        evals.update(more)
        alignment = self.alignment(teachers, refs, main_runs)
        return self.report(stages, runs, evals, alignment)

    def data_stage(self, corpus: dict, tokenizer: dict) -> dict:
        raise NotImplementedError

    def extract_flags(self) -> tuple[str, ...]:
        return ()

    def ablation_table_arms(self) -> list[str]:
        return ablation_rows(self.arms)


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
