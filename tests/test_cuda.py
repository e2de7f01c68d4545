"""The CUDA paths, checked on a GPU (each CUDA test is skipped where torch sees none, as in CI):
mixed precision (bf16 autocast; fp16 autocast with the grad scaler) against fp32, the shared
prefix against the plain path, the chunked head losses against the formula in float64, the
compiled KL kernel (Triton) against the eager one, exact-enough resume after a SIGTERM, and a
non-finite step that never updates the weights. `bench/gpu_check.sh` runs this file on a GPU box.

The non-finite-step test also runs on the CPU with the grad scaler switched on, so that the fp16
path of the optimiser step is covered where no GPU exists.
"""
import dataclasses
import os
import signal

import pytest
import torch
from clm_helpers import tiny_causal
from helpers import head_losses_eager_and_compiled, tiny_bert, tiny_distilbert, train_argv
from safetensors.torch import load_file

import causal_distiller
import causal_train
from batching import BatchPreparer, length_mask
from causal_distiller import _usable_outside_inference, compute_losses, needs_from_alphas
from checkpoints import load_training_state
from interventions import model_outputs

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
VOCAB = 120
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _autocast(dtype_name: str):
    dtype = AMP[dtype_name]
    return torch.autocast("cuda", dtype=dtype, enabled=dtype is not None)


# --- the chunked head losses against the formula ---------------------------------------------------
@CUDA
@pytest.mark.parametrize("vocab, rows", [(3000, 5000), (128256, 2500)], ids=["bert-vocab", "llama3-vocab"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_head_losses_on_cuda_equal_the_float64_formula(vocab, rows, dtype_name):
    import losses
    from losses import head_losses

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = 64
    proj, t_proj = torch.nn.Linear(h, vocab).to(dev), torch.nn.Linear(h, vocab).to(dev)
    s_feat = torch.randn(rows, h, device=dev, generator=g).requires_grad_()
    t_feat = torch.randn(rows, h, device=dev, generator=g)
    lm_rows = torch.randperm(rows, device=dev, generator=g)[: rows // 3].sort().values
    targets = torch.randint(0, vocab, lm_rows.shape, device=dev, generator=g)
    T, a_kl, a_lm = 2.0, 0.3, 0.7
    assert rows > losses._chunk_rows(s_feat, vocab)  # several chunks, and a last one of another size
    with _autocast(dtype_name):
        total, kl, lm = head_losses(s_feat, proj, t_feat, t_proj, lm_rows, targets, T, a_kl, a_lm)
    total.backward()
    got = [kl, lm, s_feat.grad, proj.weight.grad, proj.bias.grad]

    # the formula in float64, by autograd
    f = s_feat.detach().double().requires_grad_()
    w, b = proj.weight.detach().double().requires_grad_(), proj.bias.detach().double().requires_grad_()
    logits = f @ w.T + b
    t_logits = t_feat.double() @ t_proj.weight.double().T + t_proj.bias.double()
    ref_kl = torch.nn.functional.kl_div(torch.log_softmax(logits / T, -1), torch.log_softmax(t_logits / T, -1),
                                        reduction="sum", log_target=True) / rows * T * T
    ref_lm = torch.nn.functional.cross_entropy(logits[lm_rows], targets)
    (a_kl * ref_kl + a_lm * ref_lm).backward()
    want = [ref_kl, ref_lm, f.grad, w.grad, b.grad]
    tol = 1e-5 if dtype_name == "fp32" else 2e-2  # bf16 operands: 1e-3 to 1e-2
    for name, a, r in zip(["ce", "lm", "features", "weight", "bias"], got, want):
        assert _rel(a, r) < tol, (name, _rel(a, r))


@CUDA
def test_compiled_kl_kernel_on_cuda_equals_the_eager_one():
    pytest.importorskip("triton")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    n, h, v = 5000, 64, 30522  # two chunks of unequal size
    proj, t_proj = torch.nn.Linear(h, v).to(dev), torch.nn.Linear(h, v).to(dev)
    s_feat = torch.randn(n, h, device=dev, requires_grad=True)
    t_feat = torch.randn(n, h, device=dev)
    rows = torch.arange(0, n, 7, device=dev)
    targets = torch.randint(0, v, rows.shape, device=dev)

    eager, compiled = head_losses_eager_and_compiled(s_feat, proj, t_feat, t_proj, rows, targets)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 1e-5, _rel(a, b)


# --- the shared prefix against the plain path --------------------------------------------------------
def _pair(family: str):
    if family == "bert":
        return tiny_bert(n_layers=4), tiny_distilbert(n_layers=3), True
    return tiny_causal("llama", n_layers=4), tiny_causal("llama", n_layers=3, seed=1), False


def _losses_and_grads(family, shared_prefix, dtype_name):
    teacher, student, mlm = _pair(family)
    dev = torch.device("cuda")
    teacher.to(dev).requires_grad_(False)
    if AMP[dtype_name] is not None:
        teacher.to(AMP[dtype_name])  # as the distiller does under --bf16/--fp16
    student.to(dev).train()  # no dropout in the tiny configs
    g = torch.Generator().manual_seed(3)
    lengths, src_lengths = torch.tensor([16, 11, 14, 9]), torch.tensor([12, 16, 7, 13])
    ids, src = torch.randint(5, VOCAB, (4, 16), generator=g), torch.randint(5, VOCAB, (4, 16), generator=g)
    ids[~length_mask(lengths, 16)] = 0
    src[~length_mask(src_lengths, 16)] = 0
    probs = torch.ones(VOCAB)
    probs[:5] = 0
    torch.manual_seed(0)
    prep = BatchPreparer(mlm=mlm, vocab_size=VOCAB, mask_id=4 if mlm else None, token_probs=probs if mlm else None,
                         interchange_prop=0.4)
    p = prep.prepare({"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": src_lengths},
                     causal=True).to(dev)
    alphas = {"ce": 0.25, "mlm": 0.25 if mlm else 0.0, "clm": 0.0 if mlm else 0.25, "mse": 0.0, "cos": 0.25,
              "causal_ce": 0.25, "causal_cos": 0.25}
    sites_t = {1: torch.arange(8, 24, device=dev), 3: torch.arange(0, 32, device=dev)}
    sites_s = {0: torch.arange(0, 16, device=dev), 2: torch.arange(4, 20, device=dev)}
    needs = needs_from_alphas(alphas)
    with _autocast(dtype_name):
        with torch.inference_mode():
            t = _usable_outside_inference(model_outputs(teacher, p, sites_t, needs, want_logits=True,
                                                        shared_prefix=shared_prefix))
        s = model_outputs(student, p, sites_s, needs, want_logits=True, shared_prefix=shared_prefix)
        values, total = compute_losses(s, t, p, alphas, temperature=2.0)
    total.backward()
    grads = {n: q.grad.float() for n, q in student.named_parameters() if q.grad is not None}
    return {k: v.detach().float() for k, v in values.items()}, grads, s.forwards


@CUDA
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
def test_shared_prefix_on_cuda_equals_the_plain_path(family, dtype_name):
    plain_l, plain_g, plain_f = _losses_and_grads(family, False, dtype_name)
    fast_l, fast_g, fast_f = _losses_and_grads(family, True, dtype_name)
    assert plain_f == fast_f == {"base": 1, "source": 1, "counterfactual": 1}
    assert plain_l.keys() == fast_l.keys() and plain_g.keys() == fast_g.keys()
    # fp32: rounding only; bf16/fp16: the two paths round differently (bf16 keeps 8 bits)
    tol = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}[dtype_name]
    for k in plain_l:
        assert abs(float(fast_l[k] - plain_l[k])) <= tol * max(1.0, abs(float(plain_l[k]))), (k, fast_l[k], plain_l[k])
    scale = torch.stack([g.double().norm() for g in plain_g.values()]).norm()
    for k in plain_g:  # relative to the tensor, or to 1e-3 of the whole gradient for (near-)zero ones
        diff = float((fast_g[k].double() - plain_g[k].double()).norm())
        assert diff <= 10 * tol * max(float(plain_g[k].double().norm()), 1e-3 * float(scale)), (k, diff)
    assert not torch.allclose(fast_l["causal_ce"], fast_l["ce"])  # the intervention matters
    if dtype_name != "fp32":  # and the mixed-precision losses track fp32's
        ref_l, _, _ = _losses_and_grads(family, True, "fp32")
        for k in ref_l:
            assert abs(float(fast_l[k] - ref_l[k])) <= 5e-2 * max(1.0, abs(float(ref_l[k]))), (k, fast_l[k], ref_l[k])


# --- causal_train.py on the GPU ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(distill_setup):
    """conftest's distillation set-up (300 documents)."""
    return distill_setup


def _argv(setup, dump, *extra, n_gpu="1"):
    argv = train_argv(setup, dump, "--batch_size", "16", "--n_epoch", "2", "--log_interval", "1",
                      "--gradient_accumulation_steps", "2", "--include_crossway", *extra)
    argv[argv.index("--n_gpu") + 1] = n_gpu
    return argv


def _step_losses(caplog) -> dict[int, float]:
    """The weighted total (`loss`) of each logged step: `step N | ce x mlm y ... loss z | lr ...`."""
    out = {}
    for rec in caplog.records:
        msg = rec.getMessage()
        if msg.startswith("step ") and " loss " in msg:
            parts = msg.split("|")
            values = parts[1].split()
            out[int(parts[0].split()[1])] = float(values[values.index("loss") + 1])
    return out


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@CUDA
@pytest.mark.parametrize("flags", [("--bf16",), ("--fp16",), ("--bf16", "--compile")], ids=["bf16", "fp16", "bf16-compile"])
def test_causal_train_on_cuda_mixed_precision_tracks_fp32(setup, tmp_path, caplog, flags):
    if "--compile" in flags:
        pytest.importorskip("triton")
    from transformers import AutoModelForMaskedLM

    caplog.set_level("INFO")
    causal_train.main(_argv(setup, tmp_path / "fp32", "--max_steps", "8"))
    ref = _step_losses(caplog)
    caplog.clear()
    causal_train.main(_argv(setup, tmp_path / "amp", "--max_steps", "8", *flags))
    got = _step_losses(caplog)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 0.03 * ref[step], (step, got[step], ref[step])
    assert ref[8] < ref[1]
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "amp")  # a plain HF folder, fp32 weights
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
    # mixed precision was on: the weights track fp32's, but not bitwise
    amp, fp32 = _weights(tmp_path / "amp"), _weights(tmp_path / "fp32")
    assert any(not torch.equal(amp[k], fp32[k]) for k in amp)
    state = load_training_state(tmp_path / "amp" / "checkpoint-8" / "training_state.pt")
    if "--fp16" in flags:
        assert state["scaler"]["scale"] > 0  # the grad scaler's state travels with the checkpoint
    assert "cuda" in state["rng"][0]


@CUDA
def test_causal_train_on_cuda_llama_pair_bf16(tmp_path, corpus_lines, caplog):
    from clm_helpers import llama_distill_setup, llama_train_argv
    from transformers import AutoModelForCausalLM

    data, _ = llama_distill_setup(tmp_path, corpus_lines)
    caplog.set_level("INFO")
    argv = llama_train_argv(tmp_path, data, "--bf16", "--max_steps", "6", "--log_interval", "1")
    argv[argv.index("--n_gpu") + 1] = "1"
    causal_train.main(argv)
    losses = _step_losses(caplog)
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values())
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in student.parameters())


@CUDA
@pytest.mark.parametrize("flags", [("--fsdp",), ("--fsdp", "--fsdp_teacher", "--fsdp_cpu_offload")],
                         ids=["fsdp", "fsdp-teacher-offload"])
def test_fsdp_under_torchrun_on_cuda_tracks_one_gpu_bf16(setup, tmp_path, caplog, flags):
    """One rank of torchrun on the GPU (NCCL): FSDP2 with the bf16 policy (the student offloaded to pinned host
    memory in the second case) gives the losses of the plain one-GPU bf16 run, and saves a plain fp32 folder."""
    from test_fsdp import step_losses, torchrun
    from transformers import AutoModelForMaskedLM

    caplog.set_level("INFO")
    causal_train.main(_argv(setup, tmp_path / "one", "--max_steps", "8", "--bf16"))
    ref = _step_losses(caplog)
    out = torchrun(_argv(setup, tmp_path / "fsdp", "--max_steps", "8", "--bf16", *flags), nproc=1)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "device cuda" in log, log[-4000:]
    got = {step: values["loss"] for step, values in step_losses(log).items()}
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:  # bf16 both ways; FSDP reduces and casts in its own order
        assert abs(got[step] - ref[step]) <= 0.03 * ref[step], (step, got[step], ref[step])
    assert (tmp_path / "fsdp" / "checkpoint-8" / ".metadata").is_file()  # the checkpoint is sharded (DCP)
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "fsdp")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())


def _sigterm_after(monkeypatch, step: int):
    """Send this process a real SIGTERM once optimiser step `step` is done (the handler finishes the step)."""
    original = causal_distiller.CausalDistiller._optimizer_step

    def stepping(self, window):
        stepped = original(self, window)
        if stepped and self.n_step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return stepped

    monkeypatch.setattr(causal_distiller.CausalDistiller, "_optimizer_step", stepping)


@CUDA
@pytest.mark.parametrize("dtype_flags", [(), ("--bf16",)], ids=["fp32", "bf16"])
def test_sigterm_then_resume_on_cuda_equals_uninterrupted(setup, tmp_path, monkeypatch, dtype_flags):
    full = tmp_path / "full"
    causal_train.main(_argv(setup, full, *dtype_flags))
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _sigterm_after(m, 5)
        with pytest.raises(SystemExit) as stop:
            causal_train.main(_argv(setup, cut, *dtype_flags))
    assert stop.value.code == 128 + signal.SIGTERM
    assert [p.name for p in cut.glob("checkpoint-*")] == ["checkpoint-5"]
    causal_train.main(_argv(setup, cut, *dtype_flags, "--resume"))
    a, b = _weights(cut), _weights(full)
    assert a.keys() == b.keys()
    # The same kernels on the same data; only CUDA's atomics (embedding and index_add backward)
    # may reorder sums, so the runs agree to float rounding, not always bitwise.
    tol = 1e-5 if not dtype_flags else 1e-3
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


# --- a non-finite step never updates the weights ---------------------------------------------------------
def _built_distiller(argv, monkeypatch):
    """causal_train.main up to the training loop: the distiller it built, on the device it chose."""
    built = []
    monkeypatch.setattr(causal_distiller.CausalDistiller, "train", lambda self: built.append(self))
    causal_train.main(argv)
    return built[0]


@pytest.mark.parametrize("device, flags", [
    ("cpu", ("--skip_nonfinite_steps", "1")),  # with the grad scaler switched on by hand below
    pytest.param("cuda", ("--fp16", "--skip_nonfinite_steps", "1"), marks=CUDA, id="cuda-fp16"),
    pytest.param("cuda", ("--bf16", "--skip_nonfinite_steps", "1"), marks=CUDA, id="cuda-bf16"),
], ids=["cpu-scaler", "cuda-fp16", "cuda-bf16"])
def test_nonfinite_step_never_updates_the_weights(setup, tmp_path, monkeypatch, device, flags):
    distiller = _built_distiller(_argv(setup, tmp_path / "run", *flags, n_gpu="1" if device == "cuda" else "0"),
                                 monkeypatch)
    if device == "cpu":  # the fp16 path's grad scaler, where fp16 itself is refused
        distiller.params = dataclasses.replace(distiller.params, fp16=True)  # (the config is frozen)
        distiller.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=True)
    assert distiller.device.type == device
    batches = distiller.epoch_batches(0)
    loader = distiller.collated(batches[:3])
    original = causal_distiller.compute_losses

    def poisoned(*args, **kwargs):
        values, total = original(*args, **kwargs)
        return values, total * float("nan")

    before = {k: v.detach().clone() for k, v in distiller.student.state_dict().items()}
    with monkeypatch.context() as m:
        m.setattr(causal_distiller, "compute_losses", poisoned)
        window = distiller._micro_step(next(loader), sync=True)
    assert not torch.isfinite(window["loss"])
    assert distiller._optimizer_step(window) is False  # skipped (1 skip allowed)
    after = distiller.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in distiller.student.parameters())
    assert not distiller.optimizer.state  # no moment was touched either
    # ... and training goes on: the next finite step updates the weights
    window = distiller._micro_step(next(loader), sync=True)
    assert distiller._optimizer_step(window) is True
    assert distiller.optimizer.state
    changed = distiller.student.state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before if changed[k].is_floating_point())
    # a second non-finite step with no skip left stops the run, the weights again untouched
    before = {k: v.detach().clone() for k, v in changed.items()}
    with monkeypatch.context() as m:
        m.setattr(causal_distiller, "compute_losses", poisoned)
        window = distiller._micro_step(next(loader), sync=True)
    with pytest.raises(causal_distiller.NonFiniteLoss):
        distiller._optimizer_step(window)
    assert all(torch.equal(before[k], v) for k, v in distiller.student.state_dict().items())
