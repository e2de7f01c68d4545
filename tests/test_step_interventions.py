"""Interventions through the real training step (`CausalDistiller.losses_for_batch`, teacher and student,
shared prefix and plain path), checked against unhooked forwards of the stock models.

- a full-width swap at every real position gives exactly the source run's output;
- a swap whose source is the base gives exactly the base run;
- site by site, what the next block receives is the base run's block output with the chosen
  positions and dimensions taken from the source run's output of the same block
  (`output_hidden_states`, no hooks).
The original read the source at block l's input and wrote at block l's output: each of these fails then.
"""
import pytest
import torch
from helpers import in_memory_distiller, tiny_bert, tiny_distilbert, tiny_gpt2

import causal_distiller
from interventions import family_of, get_submodule, head_features

VOCAB, HIDDEN = 120, 32
PAIRS = {  # teacher, student, mlm
    "bert->distilbert": (lambda: tiny_bert(n_layers=4), lambda: tiny_distilbert(n_layers=3), True),
    "gpt2->gpt2": (lambda: tiny_gpt2(n_layers=4), lambda: tiny_gpt2(n_layers=3, seed=5), False),
}


def _distiller(pair, t_sites, s_sites, *, shared_prefix, interchange_prop=1.0, mode="consecutive", mask_prop=0.15):
    make_t, make_s, mlm = PAIRS[pair]
    teacher, student = make_t(), make_s()
    kind = ("bert", "distilbert") if mlm else ("gpt2", "gpt2")
    argv = ["--dump_path", "unused", "--data_file", "unused", "--student_type", kind[1], "--student_config", "unused",
            "--teacher_type", kind[0], "--teacher_name", "unused", "--n_gpu", "0", "--alpha_ce", "1.0",
            "--alpha_cos", "1.0", "--alpha_causal_ce", "1.0", "--alpha_causal_cos", "1.0", "--temperature", "1.0",
            "--interchange_prop", str(interchange_prop), "--mlm_mask_prop", str(mask_prop), "--batch_size", "3"]
    argv += ["--mlm", "--alpha_mlm", "0.0", "--alpha_clm", "0.0", "--token_counts", "unused"] if mlm else []
    argv += ["--interchange_consecutive_only"] if mode == "consecutive" else []
    argv += [] if shared_prefix else ["--no_shared_prefix"]
    distiller = in_memory_distiller(argv, teacher, student, t_sites, s_sites, VOCAB, mlm)
    return distiller, teacher, student


def _batch(same_source=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 9, 7])  # padding included; source rows as long as their base rows
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    src = ids.clone() if same_source else torch.randint(5, VOCAB, (3, 12), generator=g)
    for t in (ids, src):
        t[:, 0] = 2
        t[torch.arange(3), lengths - 1] = 3
        t[torch.arange(12)[None] >= lengths[:, None]] = 0
    return {"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": lengths.clone()}


def _step(distiller, batch, monkeypatch):
    """Run the real step on `batch`; return (prepared, student outputs, teacher outputs, loss values)."""
    seen = {}
    original = causal_distiller.compute_losses

    def spy(s, t, p, *settings):
        seen.update(s=s, t=t, p=p)
        return original(s, t, p, *settings)

    monkeypatch.setattr(causal_distiller, "compute_losses", spy)
    torch.manual_seed(0)
    values, _ = distiller.losses_for_batch(batch)
    return seen["p"], seen["s"], seen["t"], values


def _run_outputs(model, ids, mask, p):
    """Head features at the logit rows and last hidden states at the real rows of an unhooked forward."""
    with torch.no_grad():
        last = getattr(model, family_of(model).backbone)(input_ids=ids, attention_mask=mask).last_hidden_state
    flat = last.reshape(-1, last.shape[-1])
    return head_features(model, flat.index_select(0, p.logit_idx)), flat.index_select(0, p.real_idx)


def _full(layer):
    return {layer: list(range(HIDDEN))}


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("t_layer, s_layer", [(0, 0), (1, 1), (2, 1)])
def test_full_swap_at_every_position_gives_the_source_run(pair, shared_prefix, t_layer, s_layer, monkeypatch):
    distiller, teacher, student = _distiller(pair, _full(t_layer), _full(s_layer), shared_prefix=shared_prefix)
    p, s, t, _ = _step(distiller, _batch(), monkeypatch)
    assert p.base_pos.numel() == int(p.attention_mask.sum()), "every real position is swapped"
    for model, out in ((teacher, t), (student, s)):
        features, hidden = _run_outputs(model, p.source_ids, p.source_mask, p)
        torch.testing.assert_close(out.cf_features.detach(), features, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out.cf_hidden.detach(), hidden, atol=2e-6, rtol=1e-5)
        assert not torch.allclose(out.features.detach(), features, atol=1e-3)  # the source does differ


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_swap_with_source_equal_to_base_gives_the_base_run(pair, shared_prefix, monkeypatch):
    sites = ({1: list(range(8, 24)), 3: list(range(HIDDEN))}, {0: list(range(0, 16)), 2: list(range(4, 12))})
    # every real position (the k-th base position takes the k-th source position: aligned), partial dims
    distiller, _, _ = _distiller(pair, *sites, shared_prefix=shared_prefix, mask_prop=0.0)
    p, s, t, values = _step(distiller, _batch(same_source=True), monkeypatch)
    assert torch.equal(p.source_ids, p.input_ids) and torch.equal(p.base_pos, p.source_pos)
    for out in (s, t):
        torch.testing.assert_close(out.cf_features.detach(), out.features.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out.cf_hidden.detach(), out.hidden.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(values["causal_ce"], values["ce"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values["causal_cos"], values["cos"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "plain"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_each_site_receives_the_source_block_output_of_an_unhooked_forward(pair, shared_prefix, monkeypatch):
    """Two sites per model, partial dims, random positions: what block l+1 receives in the counterfactual run."""
    t_sites = {0: list(range(4, 20)), 2: list(range(16, 32))}
    s_sites = {0: list(range(0, 8)), 1: list(range(8, 24))}
    distiller, teacher, student = _distiller(pair, t_sites, s_sites, shared_prefix=shared_prefix,
                                             interchange_prop=0.5, mode="random")
    received = {}

    def spy_inputs(model, who, layers):
        blocks = get_submodule(getattr(model, family_of(model).backbone), family_of(model).blocks)
        handles = []
        for layer in layers:
            def pre_hook(module, args, kwargs, layer=layer):
                hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                received[(who, layer)] = hidden.detach().clone()  # the last call is the counterfactual run
            handles.append(blocks[layer + 1].register_forward_pre_hook(pre_hook, with_kwargs=True))
        return handles

    handles = spy_inputs(teacher, "teacher", t_sites) + spy_inputs(student, "student", s_sites)
    try:
        p, _, _, _ = _step(distiller, _batch(), monkeypatch)
    finally:
        for h in handles:
            h.remove()
    for who, model, sites in (("teacher", teacher, t_sites), ("student", student, s_sites)):
        with torch.no_grad():
            base_hs = model(input_ids=p.input_ids, attention_mask=p.attention_mask, output_hidden_states=True).hidden_states
            src_hs = model(input_ids=p.source_ids, attention_mask=p.source_mask, output_hidden_states=True).hidden_states
        lowest = min(sites)
        for layer, dims in sites.items():
            # block `layer`'s output is hidden_states[layer + 1] in HF's numbering
            got = received[(who, layer)]
            # Below the lowest site the counterfactual run is the base run; above it, the block input already
            # carries the lower writes, so there only the swapped entries are compared with the source run.
            expected = (base_hs[layer + 1] if layer == lowest else got).clone()
            d = torch.tensor(dims)
            rows = p.batch_idx[:, None]
            expected[rows, p.base_pos[:, None], d[None, :]] = src_hs[layer + 1][rows, p.source_pos[:, None], d[None, :]]
            real = p.attention_mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=2e-6, rtol=1e-5)


def test_the_in_memory_distiller_is_built_as_causal_train_builds_it():
    """The tests' distiller goes through build_from_models: the teacher frozen and in eval mode, as in production
    (built by hand, it was left trainable)."""
    distiller, teacher, _ = _distiller("bert->distilbert", {1: (0, 1)}, {0: (0, 1)}, shared_prefix=True)
    assert distiller.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("flags, ce, causal_ce", [
    ([], "forward_kl", "forward_kl"),
    (["--divergence", "tvd", "--causal_divergence", "reverse_kl"], "tvd", "reverse_kl"),
    (["--divergence", "jsd", "--jsd_beta", "0.3"], "jsd", "jsd"),
])
def test_the_divergence_flags_reach_both_soft_target_losses(flags, ce, causal_ce, monkeypatch):
    """--divergence and --causal_divergence choose what `ce` and `causal_ce` measure, in the chunked head losses
    and in the plain path on materialised logits (--alpha_mse) alike."""
    from losses import Divergence, soft_target_loss

    batch = _batch()
    results = {}
    for path, extra in (("head", []), ("plain", ["--alpha_mse", "1e-9"])):
        make_t, make_s, _ = PAIRS["bert->distilbert"]
        teacher, student = make_t(), make_s()
        argv = ["--dump_path", "unused", "--data_file", "unused", "--student_type", "distilbert", "--student_config",
                "unused", "--teacher_type", "bert", "--teacher_name", "unused", "--n_gpu", "0", "--alpha_ce", "1.0",
                "--alpha_causal_ce", "1.0", "--alpha_clm", "0.0", "--temperature", "1.5", "--mlm", "--alpha_mlm",
                "0.0", "--token_counts", "unused", *flags, *extra]
        distiller = in_memory_distiller(argv, teacher, student, _full(1), _full(1), VOCAB)
        assert distiller.divergences == (Divergence(ce, beta=0.3 if ce == "jsd" else 0.5),
                                         Divergence(causal_ce, beta=0.3 if causal_ce == "jsd" else 0.5))
        prepared, s_out, t_out, values = _step(distiller, batch, monkeypatch)
        results[path] = values
        if path == "plain":  # the value is the divergence of the materialised logits
            want = soft_target_loss(s_out.logits(), t_out.logits(), 1.5, distiller.divergences[0])
            assert torch.allclose(values["ce"], want, rtol=1e-5)
    for name in ("ce", "causal_ce"):
        assert torch.allclose(results["head"][name], results["plain"][name], rtol=1e-4, atol=1e-7), name


def test_source_kd_is_the_standard_loss_on_base_and_source_sequences_alike():
    """--source_kd (DIITO's control): each loss is the mean of the standard loss on the base sequences and on the
    source sequences a DIITO step would draw, with no intervention."""
    argv = ["--dump_path", "unused", "--data_file", "unused", "--student_type", "gpt2", "--student_config", "unused",
            "--teacher_type", "gpt2", "--teacher_name", "unused", "--n_gpu", "0", "--alpha_ce", "1.0",
            "--alpha_clm", "0.5", "--alpha_cos", "0.3", "--alpha_causal_ce", "0", "--alpha_causal_cos", "0",
            "--temperature", "2.0", "--batch_size", "3"]
    made = {}

    def distiller(*extra):
        teacher, student = tiny_gpt2(n_layers=4), tiny_gpt2(n_layers=3, seed=5)
        made[extra] = in_memory_distiller([*argv, *extra], teacher, student, _full(1), _full(1), VOCAB, mlm=False)
        return made[extra]

    batch = _batch()
    swapped = {"base_ids": batch["source_ids"], "base_lengths": batch["source_lengths"]}
    with torch.no_grad():
        both, total = distiller("--source_kd").losses_for_batch(batch)
        plain = distiller()
        on_base, total_base = plain.losses_for_batch({k: batch[k] for k in ("base_ids", "base_lengths")})
        on_source, total_source = plain.losses_for_batch(swapped)
    assert both.keys() == on_base.keys() == {"ce", "clm", "cos"}
    for k in both:
        torch.testing.assert_close(both[k], (on_base[k] + on_source[k]) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, (total_base + total_source) / 2, rtol=1e-6, atol=0)
    assert not torch.allclose(on_base["ce"], on_source["ce"])  # (the two halves differ: the mean is not trivial)
