"""How the quickstart shares its `--jobs` cores: commands of started tasks and of the caller take the same slots."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from pipelines.quickstart import pipeline as quickstart_pipeline
from pipelines.quickstart.arms import init_name
from pipelines.quickstart.distill import DistillQuickstart
from pipelines.stages import StageFailed

# a command that records when it ran: `<start> <end>` into argv[1], after sleeping argv[2] seconds
SLEEPER = "import sys, time\nt = time.time()\ntime.sleep(float(sys.argv[2]))\nopen(sys.argv[1], 'w').write(f'{t} {time.time()}')\n"


def make_pipe(tmp_path, jobs):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pipe = quickstart_pipeline.Pipeline(tmp_path / "out", False, dict(os.environ), jobs=jobs, preload=False)

    def sleep(name: str, seconds: float = 1.0) -> str:
        pipe.command(name, str(script), [str(tmp_path / name), seconds])
        return name

    def spans() -> dict[str, tuple[float, float]]:
        return {p.name: tuple(map(float, p.read_text().split())) for p in tmp_path.iterdir() if p.suffix == ""
                and p.is_file()}

    return pipe, sleep, spans


def teacher_2_fails():
    """A task that fails half a second in, while another still runs."""
    time.sleep(0.5)
    raise StageFailed("teacher 2 failed")


def most_at_once(spans: dict[str, tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_the_callers_commands_take_the_slot_started_tasks_leave_idle(tmp_path):
    # three teachers on two slots: the caller's command (the tuning) runs beside the third, not after it,
    # and never more than two commands run at once
    pipe, sleep, spans = make_pipe(tmp_path, jobs=2)
    with pipe.started([lambda n=n: sleep(n) for n in ("t1", "t2", "t3")]) as pending:
        assert pending[0].result() == "t1"
        sleep("tuning")
        assert [f.result() for f in pending] == ["t1", "t2", "t3"]
    ran = spans()
    assert ran["tuning"][0] < ran["t3"][1]
    assert most_at_once(ran) == 2


def test_with_one_job_the_started_tasks_run_first_in_order(tmp_path):
    pipe, sleep, spans = make_pipe(tmp_path, jobs=1)
    with pipe.started([lambda n=n: sleep(n, 0) for n in ("t1", "t2")]) as pending:
        assert all(f.done() for f in pending)
        sleep("tuning", 0)
    ran = spans()
    assert ran["t1"][1] <= ran["t2"][0] <= ran["t2"][1] <= ran["tuning"][0]


def test_a_failed_task_stops_the_callers_command(tmp_path):
    # a teacher that fails must not leave the tuning running for its many minutes
    pipe, sleep, _ = make_pipe(tmp_path, jobs=2)

    start = time.time()
    with pytest.raises(StageFailed, match="teacher 2 failed"), pipe.started([lambda: sleep("t1", 0), teacher_2_fails]):
        sleep("tuning", 300)
    assert time.time() - start < 60


def test_a_units_seconds_leave_out_the_time_its_command_queued_for_a_slot(tmp_path):
    # the report's stage times (and their sum) are the commands' running times, as before slots were shared
    pipe, sleep, _ = make_pipe(tmp_path, jobs=2)
    with pipe.started([lambda n=n: sleep(n, 3) for n in ("t1", "t2")]):
        time.sleep(0.5)  # both slots taken
        start = time.time()
        marker = pipe.unit("tuning", tmp_path / "unit", {"k": 1}, lambda folder: {"slept": sleep("tuning", 0)})
        wall = time.time() - start
    assert marker["slept"] == "tuning"
    assert wall > 2 and marker["seconds"] < wall - 1.5


def test_parallel_reports_the_task_that_failed_not_one_it_stopped(tmp_path):
    pipe, sleep, _ = make_pipe(tmp_path, jobs=2)

    start = time.time()
    with pytest.raises(StageFailed, match="teacher 2 failed"):
        pipe.parallel([lambda: sleep("t1", 300), teacher_2_fails])
    assert time.time() - start < 60


def test_the_tuning_runs_while_the_last_teachers_train_and_each_init_is_made_once(tmp_path):
    """run_stages: the first teacher's student initialisation and the tuning start as soon as that teacher is
    done, beside the others; the references reuse that initialisation rather than make (or skip) it again."""
    pipe, sleep, spans = make_pipe(tmp_path, jobs=2)
    made = []

    class Fake(DistillQuickstart):
        def __init__(self):  # only what run_stages touches
            self.pipe, self.out = pipe, tmp_path
            self.preset = SimpleNamespace(teachers=3, low_resource=None, seed_recipe=True)
            self.lm, self.default_objective, self.default_smoothing = "clm", (("ce", 0.25),), None

        def corpus(self):
            return {"key": "c"}

        def tasks(self, corpus):
            return None

        def tokenizer(self, corpus):
            return {"key": "tok"}

        def teacher(self, corpus, tokenizer, k=1):
            return {"key": sleep(f"teacher{k}")}

        def data_stage(self, corpus, tokenizer):
            return {"key": "data"}

        def student_init(self, teacher, extract_flags=(), k=1):
            made.append(k)
            return {"key": f"init{k}", "teacher": teacher["key"]}

        def random_student(self, init):
            return {"key": "random"}

        def evaluate_one(self, name, model_dir, record, split="test"):
            return {"name": name, "split": split}

        def tuning(self, data, inits):
            assert list(inits) == [init_name(1)]
            sleep("tuning")
            return {"lr": 1e-3, "weight": 0.25}, {}, {}

        def students(self, data, refs):
            self.refs = refs
            return {}, {}, {}

        def alignment(self, teachers, refs, runs):
            return {}

        def downstream_models(self, teachers, refs, runs):
            return {}

        def downstream(self, tasks, models):
            return {}

        def report(self, stages, runs, evals, alignment, downstream):
            return stages

    q = Fake()
    stages = q.run_stages()
    ran = spans()
    assert ran["tuning"][0] < ran["teacher3"][1]
    assert most_at_once(ran) == 2
    assert sorted(made) == [1, 2, 3]
    assert [q.refs[init_name(k)]["teacher"] for k in (1, 2, 3)] == ["teacher1", "teacher2", "teacher3"]
    assert list(stages)[:5] == ["corpus", "tokenizer", "teacher", "teacher_t2", "teacher_t3"]
