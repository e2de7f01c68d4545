"""torchrun with 2 CPU processes (gloo): trains a few steps and both ranks end with identical weights."""
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import SUBPROCESS_ENV, free_port, train_argv


@pytest.mark.e2e
def test_torchrun_two_cpu_ranks(tmp_path, distill_setup):
    setup = distill_setup
    dump = tmp_path / "ddp"
    argv = train_argv(setup, dump, "--max_steps", "4", "--log_interval", "2", "--gradient_accumulation_steps", "2",
                      "--include_crossway")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "causal_train.py", *argv],
        cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=280,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "rank 1/2" in log and "rank 0/2" in log
    assert "all 2 ranks hold identical student weights" in log
    assert (dump / "model.safetensors").is_file()
    # only rank 0 writes: one set of logs, one final model
    assert len(list((dump / "log" / "train").glob("events.*"))) == 1
