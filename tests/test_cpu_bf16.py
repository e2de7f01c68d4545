"""--bf16 on a CPU without bf16 instructions: a warning from causal_train.py and the run_* scripts,
and a benchmark that skips its bf16 modes there and reports every failed mode with its reason."""
import logging
import platform
import subprocess
import sys

import pytest
import torch
from helpers import load_bench, train_argv

import causal_train
import devices

NO_BF16 = {"fpu", "sse4_2", "avx", "avx2", "fma"}


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices, "cpu_flags", lambda: set(NO_BF16))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_warning_names_the_capability_and_the_missing_flags(cpu_without_bf16):
    warning = devices.cpu_bf16_warning()
    assert warning is not None
    assert "AVX2" in warning and "avx512_bf16" in warning and "amx_bf16" in warning
    assert "fp32" in warning and "still used" in warning


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_no_warning_with_bf16_instructions(cpu_without_bf16, monkeypatch, flag):
    monkeypatch.setattr(devices, "cpu_flags", lambda: NO_BF16 | {flag})
    assert devices.cpu_bf16_warning() is None


def test_no_warning_where_the_flags_cannot_be_read(cpu_without_bf16, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: None)
    assert devices.cpu_bf16_warning() is None


def test_arm_needs_its_own_bf16_flag(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"fp", "asimd"})
    assert "bf16" in devices.cpu_bf16_warning()
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"fp", "asimd", "bf16"})
    assert devices.cpu_bf16_warning() is None


def test_cpu_flags_reads_this_machine():
    flags = devices.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here")
    assert flags and all(isinstance(f, str) and f for f in flags)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--bf16" in r.getMessage()]


def test_causal_train_warns_and_still_trains_in_bf16(cpu_without_bf16, tmp_path, distill_setup, caplog, monkeypatch):
    seen = {}
    import causal_distiller

    init = causal_distiller.CausalDistiller.__init__

    def spy(self, params, *args, **kwargs):
        init(self, params, *args, **kwargs)
        seen["amp"] = self.amp_dtype

    monkeypatch.setattr(causal_distiller.CausalDistiller, "__init__", spy)
    with caplog.at_level(logging.WARNING):
        causal_train.main(train_argv(distill_setup, tmp_path / "run", "--max_steps", "1", "--bf16"))
    (message,) = _warnings(caplog)
    assert "AVX2" in message and "fp32" in message
    assert seen["amp"] == torch.bfloat16  # still honoured


def test_causal_train_is_quiet_without_bf16_or_on_a_bf16_cpu(cpu_without_bf16, tmp_path, distill_setup, caplog,
                                                            monkeypatch):
    with caplog.at_level(logging.WARNING):
        causal_train.main(train_argv(distill_setup, tmp_path / "fp32", "--max_steps", "1"))
        monkeypatch.setattr(devices, "cpu_flags", lambda: NO_BF16 | {"amx_bf16"})
        causal_train.main(train_argv(distill_setup, tmp_path / "amx", "--max_steps", "1", "--bf16"))
    assert _warnings(caplog) == []


def test_finetune_scripts_warn(cpu_without_bf16, tmp_path, caplog):
    import finetune_common

    args = finetune_common.FinetuneTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True)
    with caplog.at_level(logging.WARNING):
        finetune_common.setup_logging(args)
    (message,) = _warnings(caplog)
    assert "AVX2" in message


def _child_succeeded(cmd):
    """What a bench child that ran its (mode, dtype) to the end prints: one JSON row of figures."""
    import json

    row = dict(mode=cmd[cmd.index("--mode") + 1], dtype=cmd[cmd.index("--dtype") + 1], median_step_s=1.0, seq_s=1.0,
               tok_s=100.0, peak_gib=1.0, gflop_per_token=1.0, flop_s=1e11, mean_loss=1.0, forwards={},
               yardstick=1e12)
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")


def _fake_children(monkeypatch, bench, child) -> None:
    """The bench's children (one per mode and precision) answered by `child(cmd)`; any other command runs."""
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "--mode" not in cmd:  # not a bench child (platform.processor runs uname)
            return real_run(cmd, **kwargs)
        return child(cmd)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)


def test_bench_skips_bf16_modes_on_such_a_cpu(cpu_without_bf16, monkeypatch, capsys):
    bench = load_bench()
    ran = []

    def child(cmd):
        ran.append(cmd[cmd.index("--dtype") + 1])
        return _child_succeeded(cmd)

    _fake_children(monkeypatch, bench, child)
    monkeypatch.setattr(sys, "argv", ["bench", "--modes", "kd", "--dtypes", "fp32,bf16"])
    bench.main()
    out = capsys.readouterr()
    assert ran == ["fp32"]
    assert "skipping the bf16 modes" in out.err and "AVX2" in out.err
    assert "| kd | fp32 |" in out.out and "bf16 |" not in out.out

    ran.clear()
    monkeypatch.setattr(sys, "argv", ["bench", "--modes", "kd", "--dtypes", "fp32,bf16", "--force_bf16"])
    bench.main()
    assert ran == ["fp32", "bf16"]

    monkeypatch.setattr(sys, "argv", ["bench", "--modes", "kd", "--dtypes", "bf16"])
    with pytest.raises(SystemExit, match="only bf16"):
        bench.main()


@pytest.mark.parametrize("result, reason", [
    (subprocess.CompletedProcess([], -9, stdout="", stderr=""), "killed by SIGKILL (the kernel's out-of-memory"),
    (subprocess.CompletedProcess([], 3, stdout="", stderr="RuntimeError: boom\n"), "exit status 3"),
    (subprocess.TimeoutExpired([], 5, stderr=b"still going"), "timed out after 5 s"),
])
def test_bench_reports_a_failed_mode_and_runs_the_rest(monkeypatch, capsys, result, reason):
    bench = load_bench()
    calls = []

    def child(cmd):
        mode = cmd[cmd.index("--mode") + 1]
        calls.append(mode)
        if mode == "kd":
            if isinstance(result, Exception):
                raise result
            return result
        return _child_succeeded(cmd)

    _fake_children(monkeypatch, bench, child)
    monkeypatch.setattr(sys, "argv", ["bench", "--modes", "kd,diito_shared", "--dtypes", "fp32", "--timeout", "5"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    assert calls == ["kd", "diito_shared"]  # the failure did not stop the bench
    assert f"kd fp32 failed: {reason}" in out.err
    stderr = getattr(result, "stderr", "")
    if isinstance(stderr, bytes):
        stderr = stderr.decode()
    assert (stderr.strip() or "(the mode wrote nothing to stderr)") in out.err
    assert "| diito_shared | fp32 |" in out.out
    assert f"- kd fp32: {reason}" in out.out
