"""Llama-layout causal LMs (llama, mistral, qwen2, qwen3, gemma, olmo2, smollm3): the same hooks,
extraction, shared prefix and `$H:` slicing as the other families, on tiny configs built here."""
import json

import pytest
import torch
from clm_helpers import FAMILY_OVERRIDES, llama_distill_setup, llama_train_argv, tiny_causal

from batching import BatchPreparer, length_mask
from causal_distiller import _usable_outside_inference, compute_losses, needs_from_alphas
from interventions import FAMILIES, LLAMA_LAYOUT, interchange, lm_logits, model_outputs, model_shape, run_model
from neuron_mapping import load_neuron_mapping, parse_variable_name
from utils import CliError

VOCAB = 120
assert set(FAMILY_OVERRIDES) == set(LLAMA_LAYOUT)  # every row is tested


def _inputs(bsz=3, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (bsz, width), generator=g)
    lengths = torch.tensor([width, width - 3, width - 5])[:bsz]
    return ids, length_mask(lengths, width).long()


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_hooks_read_block_outputs_and_slices_resume(family):
    """Plain run = stock logits; site l = hidden_states[l + 1]; stopping and resuming above a block
    (the shared prefix) gives the full run's output, masks and rotary positions included."""
    model = tiny_causal(family)
    ids, mask = _inputs()
    n = model.config.num_hidden_layers
    last, cap = run_model(model, ids, mask, capture=tuple(range(n)))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(lm_logits(model, last), ref.logits)
    for layer in range(n - 1):  # the last entry has the final norm applied
        torch.testing.assert_close(cap[layer], ref.hidden_states[layer + 1])
        assert not torch.allclose(cap[layer], ref.hidden_states[layer])
    for layer in range(n - 1):
        none, part = run_model(model, ids, mask, capture=(layer,), stop_after=layer)
        assert none is None
        torch.testing.assert_close(part[layer], cap[layer])
        resumed, _ = run_model(model, ids, mask, start_after=(layer, cap[layer]))
        torch.testing.assert_close(resumed, last)
    assert len(model.model.layers) == n and len(getattr(model.config, "layer_types", None) or [0] * n) == n


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_full_width_swap_at_every_position_gives_the_source_run(family):
    model = tiny_causal(family)
    base_ids, mask = _inputs(seed=0)
    src_ids, _ = _inputs(seed=1)
    bsz, width = base_ids.shape
    layer = 1
    src_last, src = run_model(model, src_ids, mask, capture=(layer, layer + 1))
    bi = torch.arange(bsz).repeat_interleave(width)
    pos = torch.arange(width).repeat(bsz)
    dims = torch.arange(model.config.hidden_size)
    write = {layer: lambda h: interchange(h, src[layer], dims, bi, pos, pos)}
    cf_last, cap = run_model(model, base_ids, mask, writes=write, capture=(layer, layer + 1))
    torch.testing.assert_close(cap[layer], src[layer])  # written at block l's output ...
    torch.testing.assert_close(cap[layer + 1], src[layer + 1])  # ... so block l + 1 reads it
    torch.testing.assert_close(cf_last, src_last)
    base_last, _ = run_model(model, base_ids, mask)
    assert not torch.allclose(base_last, src_last)


def _extracted(family, tmp_path, *flags):
    """(teacher, the student scripts/extract.py makes of it with `flags`, (missing, unexpected) keys of its weights)."""
    import extract

    teacher = tiny_causal(family)
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student.pth"
    extract.main(["--model_type", family, "--model_name", str(tmp_path / "teacher"), "--dump_checkpoint", str(out),
                  *flags])
    fam = FAMILIES[family]
    student = fam.model_class(fam.config_class.from_json_file(tmp_path / "student.config.json")).eval()
    keys = student.load_state_dict(torch.load(out, weights_only=True), strict=False)
    return teacher, student, keys


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_extracted_student_with_every_block_reproduces_the_teacher(family, tmp_path):
    teacher, student, (missing, unexpected) = _extracted(family, tmp_path, "--num_layers", "4")
    assert not unexpected and set(missing) <= set(student._tied_weights_keys or {})
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=mask).logits,
                                   teacher(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert json.loads((tmp_path / "student.pth.json").read_text())["teacher_layers"] == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["qwen2", "smollm3"])
def test_extraction_keeps_each_chosen_blocks_per_layer_config(family, tmp_path):
    """A student of blocks 0, 2, 3 runs each block as the teacher did (attention kind, RoPE or not):
    its output equals the teacher's run with block 1 skipped."""
    teacher, student, _ = _extracted(family, tmp_path, "--layers", "0,2,3")
    ids, mask = _inputs()
    _, cap = run_model(teacher, ids, mask, capture=(0,), stop_after=0)
    skipped, _ = run_model(teacher, ids, mask, start_after=(1, cap[0]))  # block 0's output fed to block 2
    want, _ = run_model(student, ids, mask)
    torch.testing.assert_close(want, skipped)


def _clm_losses_and_grads(shared_prefix, teacher, student, sites_t, sites_s, alphas):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    lengths, src_lengths = torch.tensor([16, 11, 14, 9]), torch.tensor([12, 16, 7, 13])
    ids, src = torch.randint(5, VOCAB, (4, 16), generator=g), torch.randint(5, VOCAB, (4, 16), generator=g)
    ids[~length_mask(lengths, 16)] = 0
    src[~length_mask(src_lengths, 16)] = 0
    prep = BatchPreparer(mlm=False, vocab_size=VOCAB, interchange_prop=0.4)
    p = prep.prepare({"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": src_lengths},
                     causal=True)
    student.zero_grad(set_to_none=True)
    needs = needs_from_alphas(alphas)
    with torch.inference_mode():
        t = _usable_outside_inference(model_outputs(teacher, p, sites_t, needs, want_logits=True,
                                                    shared_prefix=shared_prefix))
    s = model_outputs(student, p, sites_s, needs, want_logits=True, shared_prefix=shared_prefix)
    losses, total = compute_losses(s, t, p, alphas, temperature=2.0)
    total.backward()
    return {k: v.detach() for k, v in losses.items()}, {n: q.grad.clone() for n, q in student.named_parameters()
                                                        if q.grad is not None}


@pytest.mark.parametrize("pair", [("llama", "qwen2"), ("qwen3", "mistral")])
@pytest.mark.parametrize("mse", [0.0, 0.1], ids=["fused-head", "logits"])
def test_shared_prefix_equals_plain_path_across_families(pair, mse):
    teacher, student = tiny_causal(pair[0], n_layers=4), tiny_causal(pair[1], n_layers=3, seed=1)
    teacher.requires_grad_(False)
    student.train()  # no dropout in the tiny configs
    sites_t = {1: torch.arange(8, 24), 3: torch.arange(0, 32)}
    sites_s = {1: torch.arange(0, 16), 2: torch.arange(4, 20)}
    alphas = {"ce": 0.25, "mlm": 0.0, "clm": 0.25, "mse": mse, "cos": 0.25, "causal_ce": 0.25, "causal_cos": 0.25}
    plain_l, plain_g = _clm_losses_and_grads(False, teacher, student, sites_t, sites_s, alphas)
    fast_l, fast_g = _clm_losses_and_grads(True, teacher, student, sites_t, sites_s, alphas)
    assert plain_l.keys() == fast_l.keys() == {k for k, v in alphas.items() if v > 0}
    for k in plain_l:
        torch.testing.assert_close(fast_l[k], plain_l[k], atol=1e-5, rtol=1e-5)
    assert plain_g.keys() == fast_g.keys()
    assert "lm_head.weight" in fast_g or "model.embed_tokens.weight" in fast_g  # the head (tied or not) learns
    for k in plain_g:
        torch.testing.assert_close(fast_g[k], plain_g[k], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(fast_l["causal_ce"], fast_l["ce"])


def test_gqa_head_slices_are_residual_stream_slices():
    """hidden 32, 4 query heads of head_dim 16 (not 32 / 4), 2 key/value heads: `$H:2$[0:8]` is
    residual-stream dimensions 16..23, and a write there changes exactly those dimensions."""
    model = tiny_causal("llama")
    assert model.config.head_dim == 16 and model.config.num_key_value_heads == 2
    shape = model_shape(model)
    assert shape.head_dim == 8
    sites = parse_variable_name("$L:1$H:2$[0:8]", shape)
    assert sites == {1: tuple(range(16, 24))}
    assert parse_variable_name("$L:[0:2]$H:[1:3]$[2:4]", shape) == {0: (10, 11, 18, 19), 1: (10, 11, 18, 19)}
    ids, mask = _inputs(seed=0)
    src_ids, _ = _inputs(seed=1)
    _, src = run_model(model, src_ids, mask, capture=(1,))
    _, base = run_model(model, ids, mask, capture=(1,))
    dims = torch.tensor(sites[1])
    bi, pos = torch.tensor([0, 1, 2]), torch.tensor([3, 0, 4])
    _, cap = run_model(model, ids, mask, capture=(1,),
                       writes={1: lambda h: interchange(h, src[1], dims, bi, pos, pos)})
    changed = {tuple(c) for c in (cap[1] != base[1]).nonzero().tolist()}
    assert changed == {(b, p, d) for b, p in zip(bi.tolist(), pos.tolist()) for d in range(16, 24)}
    # the attention's head_dim (16) is not a slice width
    with pytest.raises(ValueError, match=r"\[0:16\].*has 8 dimensions \(hidden_size 32 / 4 heads\)"):
        parse_variable_name("$L:1$H:0$[0:16]", shape)


@pytest.mark.parametrize("name, message", [
    ("$L:4$H:0$[0:8]", "layer 4 .* out of range: the model has 4 layers"),
    ("$L:[2:5]$H:0$[0:8]", "layer 4 .* out of range: the model has 4 layers"),
    ("$L:1$H:[2:5]$[0:8]", "head 4 .* out of range: the model has 4 heads"),
    ("$L:1$H:0$[4:9]", r"\[4:9\] .* out of range"),
])
def test_mapping_past_the_model_is_a_clear_error(name, message, tmp_path):
    shape = model_shape(tiny_causal("qwen2"))
    path = tmp_path / "bad.nm"
    path.write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:0$H:0$[0:8]"], "student_variable_names": [name]}]}))
    with pytest.raises(CliError, match=f"{path}, entry 0, student variable .*{message}"):
        load_neuron_mapping(path, shape, shape)


# --- end to end: binarize with --tokenizer_type, extract, distil with DIITO, reload ---------------

def test_causal_train_distils_a_llama_student_that_reloads(tmp_path, corpus_lines, caplog):
    import causal_train
    from transformers import AutoModelForCausalLM

    from binarized_io import load_corpus

    data, tok = llama_distill_setup(tmp_path, corpus_lines)
    corpus = load_corpus(data)
    first = corpus[0]
    assert first[0] == tok.bos_token_id and first[-1] == tok.eos_token_id  # BOS text EOS from the tokenizer
    caplog.set_level("INFO")
    causal_train.main(llama_train_argv(tmp_path, data))
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 4 |")]
    assert steps and " clm " in steps[0] and " causal_ce " in steps[0] and " causal_cos " in steps[0]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    initial = torch.load(tmp_path / "student.pth", weights_only=True)
    trained = student.state_dict()
    assert all(trained[k].shape == v.shape for k, v in initial.items())
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])


def test_causal_train_bad_inputs_get_clear_errors(tmp_path, corpus_lines):
    import causal_train

    data, tok = llama_distill_setup(tmp_path, corpus_lines)
    # a student config with another vocabulary
    cfg = json.loads((tmp_path / "student.config.json").read_text())
    cfg["vocab_size"] += 7
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    argv = llama_train_argv(tmp_path, data)
    argv[argv.index("--student_config") + 1] = str(tmp_path / "other.json")
    argv[argv.index("--student_pretrained_weights"):argv.index("--student_pretrained_weights") + 2] = []
    with pytest.raises(CliError, match="vocabulary sizes differ"):
        causal_train.main(argv)
    # a mapping past the student's depth (2 blocks)
    (tmp_path / "deep.nm").write_text(json.dumps({"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:3$H:0$[0:8]"], "student_variable_names": ["$L:2$H:0$[0:8]"]}]}))
    argv = llama_train_argv(tmp_path, data, "--force")
    argv[argv.index("--neuron_mapping") + 1] = str(tmp_path / "deep.nm")
    with pytest.raises(CliError, match="student variable '.L:2.*the model has 2 layers"):
        causal_train.main(argv)
    with pytest.raises(CliError, match="--mlm needs masked-LM models"):
        causal_train.main(llama_train_argv(tmp_path, data, "--force", "--mlm", "--alpha_clm", "0"))
    with pytest.raises(CliError, match="rotary positions"):
        causal_train.main(llama_train_argv(tmp_path, data, "--force", "--freeze_pos_embs"))


def test_binarize_llama_tokenizer_beyond_uint16(tmp_path):
    """A 70,000-entry vocabulary: ids are stored as int32, BOS/EOS are the tokenizer's; a tokenizer
    without a BOS (Qwen's) opens each example with its EOS."""
    import binarized_data
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from binarized_io import load_corpus

    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"<unk>": 70000, "<s>": 70001, "</s>": 70002})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = tmp_path / "c.txt"
    text.write_text("w5 w65536 w69999\nw70 w66000\n")
    for name, bos, first in (("llama", "<s>", 70001), ("qwen2", None, 70002)):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>")
        fast.save_pretrained(tmp_path / name)
        out = binarized_data.main(["--file_path", str(text), "--tokenizer_type", name, "--tokenizer_name",
                                   str(tmp_path / name), "--dump_file", str(tmp_path / name / "bin"), "--seed", "0"])
        corpus = load_corpus(out)
        assert corpus.dtype == np.int32
        got = sorted(tuple(int(x) for x in corpus[i]) for i in range(len(corpus)))
        assert got == sorted([(first, 5, 65536, 69999, 70002), (first, 70, 66000, 70002)])


# --- shipped configs and mappings (training_configs/causal_lm) -------------------------------------

CAUSAL_CONFIGS = {  # file: (model_type, student depth, teacher's (depth, hidden, heads) on the hub)
    "distil-smollm2-135m.json": ("llama", 10, (30, 576, 9)),  # HuggingFaceTB/SmolLM2-135M
    "distil-qwen2.5-0.5b.json": ("qwen2", 12, (24, 896, 14)),  # Qwen/Qwen2.5-0.5B
    "distil-qwen3-0.6b.json": ("qwen3", 14, (28, 1024, 16)),  # Qwen/Qwen3-0.6B-Base
}
CAUSAL_MAPPINGS = {
    "smollm2-135m_10L_middle.nm": "distil-smollm2-135m.json",
    "qwen2.5-0.5b_12L_middle.nm": "distil-qwen2.5-0.5b.json",
    "qwen2.5-0.5b_12L_multilayer.nm": "distil-qwen2.5-0.5b.json",
    "qwen3-0.6b_14L_middle.nm": "distil-qwen3-0.6b.json",
}


def test_shipped_causal_configs_and_mappings(repo_root):
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuron_mapping import ModelShape

    folder = repo_root / "training_configs" / "causal_lm"
    readme = (repo_root / "training_configs" / "README.md").read_text()
    assert {p.name for p in folder.glob("*.json")} == set(CAUSAL_CONFIGS)
    assert {p.name for p in folder.glob("*.nm")} == set(CAUSAL_MAPPINGS)
    shapes = {}
    for name, (model_type, depth, (t_depth, hidden, heads)) in CAUSAL_CONFIGS.items():
        assert f"`causal_lm/{name}`" in readme, name
        fields = json.loads((folder / name).read_text())
        assert fields.pop("model_type") == model_type
        config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert type(model) is FAMILIES[model_type].model_class and len(model.model.layers) == depth
        student = model_shape(model)
        assert (student.hidden_size, student.n_heads) == (hidden, heads)
        shapes[name] = (ModelShape(t_depth, hidden, heads), student)
    for name, config_name in CAUSAL_MAPPINGS.items():
        assert f"`causal_lm/{name}`" in readme, name
        assert load_neuron_mapping(folder / name, *shapes[config_name])


def test_head_loss_chunks_shrink_for_large_vocabularies():
    """A 151,936-entry vocabulary (Qwen) gets fewer rows per chunk, so a chunk's temporaries stay
    the size they have for BERT's 30,522; the chunked losses still equal the materialised ones."""
    import losses
    from losses import head_losses

    cpu = torch.empty(0)
    assert losses._chunk_rows(cpu, 30522) == losses.CHUNK_ROWS["cpu"]
    assert losses._chunk_rows(cpu, 151936) * 151936 <= losses.CHUNK_ROWS["cpu"] * 30522 * 1.08
    assert losses._chunk_rows(cpu, 10**9) == 1
    torch.manual_seed(0)
    n, h, v = 300, 8, 70000  # three chunks of 119 rows
    proj, t_proj = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=False)  # Llama heads: no bias
    s_feat, t_feat = torch.randn(n, h, requires_grad=True), torch.randn(n, h)
    rows = torch.arange(0, n, 2)
    targets = torch.randint(0, v, (len(rows),))
    total, kl, lm = head_losses(s_feat, proj, t_feat, t_proj, rows, targets, 2.0, 0.5, 0.5)
    total.backward()
    got = (s_feat.grad.clone(), proj.weight.grad.clone())
    s_feat.grad = proj.weight.grad = None
    logits = proj(s_feat)
    ref_kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, -1), torch.log_softmax(t_proj(t_feat) / 2, -1),
                                        reduction="sum", log_target=True) / n * 4
    ref_lm = torch.nn.functional.cross_entropy(logits[rows], targets)
    (0.5 * ref_kl + 0.5 * ref_lm).backward()
    torch.testing.assert_close(kl, ref_kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm, ref_lm.detach(), atol=1e-5, rtol=1e-5)
    for g, p in zip(got, (s_feat, proj.weight)):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
