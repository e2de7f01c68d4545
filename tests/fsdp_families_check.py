"""Run under torchrun (tests/test_fsdp.py): for every family of `interventions.FAMILIES`, a tiny teacher and
student sharded with FSDP2 as `causal_train.py --fsdp --fsdp_teacher` shards them give the losses and the
gradients of the same models unsharded, with the sites on every block (one block at a time, and two at once),
through the shared prefix and the plain path. Every rank uses the same batch, so the gradients FSDP
averages over the ranks are the unsharded ones. Prints `OK <family> <checks>` per family on rank 0;
exits non-zero on the first difference."""
from __future__ import annotations

import copy
import faulthandler
import os
import sys

import torch
import torch.distributed as dist

from batching import BatchPreparer
from causal_distiller import _usable_outside_inference, compute_losses, needs_from_alphas
from devices import end_process_group
from clm_helpers import tiny_causal
from interventions import FAMILIES, LLAMA_LAYOUT, model_outputs
from sharding import StudentLosses, TeacherRuns, shard

VOCAB, HIDDEN = 120, 32
ALPHAS = {"ce": 0.5, "mlm": 0.0, "clm": 0.5, "mse": 0.0, "cos": 0.1, "causal_ce": 0.5, "causal_cos": 0.1}


def tiny(family: str, n_layers: int, seed: int):
    """A small model of `family` (no dropout), random weights."""
    from transformers import BertConfig, DistilBertConfig, GPT2Config, RobertaConfig

    if family in LLAMA_LAYOUT:
        return tiny_causal(family, n_layers=n_layers, seed=seed)
    torch.manual_seed(seed)
    bert = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n_layers, num_attention_heads=4,
                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = {
        "bert": lambda: BertConfig(max_position_embeddings=128, **bert),
        "roberta": lambda: RobertaConfig(max_position_embeddings=130, pad_token_id=1, **bert),
        "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=n_layers, n_heads=4,
                                               hidden_dim=64, dropout=0.0, attention_dropout=0.0,
                                               max_position_embeddings=128),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=n_layers, n_head=4, n_positions=128,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    }[family]()
    return FAMILIES[family].model_class(config)


def prepared_batch(mlm: bool):
    """The same prepared base/source batch on every rank (a seeded generator, then a seeded preparer)."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([12, 9, 7, 11])
    ids = torch.randint(5, VOCAB, (4, 12), generator=g)
    src = torch.randint(5, VOCAB, (4, 12), generator=g)
    batch = {"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": lengths.flip(0)}
    token_probs = torch.ones(VOCAB)
    token_probs[:5] = 0
    preparer = BatchPreparer(mlm=mlm, vocab_size=VOCAB, mask_id=4 if mlm else None, token_probs=token_probs if mlm else None,
                             mlm_mask_prop=0.3, pred_probs=(0.8, 0.1, 0.1), restrict_ce_to_mask=False,
                             interchange_prop=0.4, interchange_max_token=-1, interchange_mode="consecutive",
                             masked_only=False, pad_to_multiple_of=1, max_width=64, pad_id=0)
    torch.manual_seed(11)
    return preparer.prepare(batch, causal=True)


def site_choices(t_layers: int, s_layers: int):
    """(teacher sites, student sites, shared prefix): every block on each side once (the shared prefix), then two
    blocks at once on each side (the shared prefix, then the plain path)."""
    dims = torch.arange(0, HIDDEN // 2)
    for t in range(t_layers):
        yield {t: dims}, {t % s_layers: dims}, True
    for shared_prefix in (True, False):
        yield {1: dims, t_layers - 1: dims[:8]}, {0: dims, s_layers - 1: dims[:8]}, shared_prefix


def check_family(family: str, mesh) -> int:
    mlm = FAMILIES[family].mlm
    alphas = {**ALPHAS, "mlm": 0.5 if mlm else 0.0, "clm": 0.0 if mlm else 0.5}
    needs = needs_from_alphas(alphas)
    teacher, student = tiny(family, 4, 0).eval(), tiny(family, 2, 1).train()
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    for model in (teacher, ref_teacher):
        model.requires_grad_(False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    s_root, t_root = StudentLosses(student, compute_losses), TeacherRuns(teacher)
    shard(student, s_root, mesh, MixedPrecisionPolicy(), OffloadPolicy())
    shard(teacher, t_root, mesh, MixedPrecisionPolicy(), OffloadPolicy())
    p = prepared_batch(mlm)
    checks = 0
    for t_sites, s_sites, shared_prefix in site_choices(4, 2):
        where = f"{family}, sites {sorted(t_sites)} -> {sorted(s_sites)}, shared prefix {shared_prefix}"
        with torch.inference_mode():
            t_ref = model_outputs(ref_teacher, p, t_sites, needs, want_logits=True, shared_prefix=shared_prefix)
        with torch.no_grad():  # as causal_train.py runs a sharded teacher (FsdpEngine.teacher_mode)
            t_out = t_root([p], t_sites, needs, False, shared_prefix)[0]
        ref_values, ref_total = compute_losses(
            model_outputs(ref_student, p, s_sites, needs, want_logits=True, shared_prefix=shared_prefix),
            _usable_outside_inference(t_ref), p, alphas, 2.0)
        ref_total.backward()
        _, [(values, total)] = s_root([p], s_sites, needs, False, shared_prefix, [_usable_outside_inference(t_out)],
                                      alphas, 2.0)
        t_root.reshard()
        total.backward()
        torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-5, atol=1e-6, msg=where)
        for name in ref_values:
            torch.testing.assert_close(values[name], ref_values[name], rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")
        compare_gradients(student, ref_student, where)
        checks += 1
    return checks


def compare_gradients(student, ref_student, where: str) -> None:
    """The gathered gradient of every sharded parameter equals the unsharded one's; both are then cleared."""
    ref_grads = dict(ref_student.named_parameters())
    for name, param in student.named_parameters():
        ref = ref_grads[name].grad
        got = None if param.grad is None else param.grad.full_tensor()
        assert (got is None) == (ref is None), f"{where}: gradient of {name}: {got is None} vs {ref is None}"
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=f"{where}: gradient of {name}")
    student.zero_grad(set_to_none=True)
    ref_student.zero_grad(set_to_none=True)


def check_all(families: list[str]) -> None:
    """Check each family on a mesh over every rank; the mesh (and its group) is freed on return."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for family in families:
        checks = check_family(family, mesh)
        if dist.get_rank() == 0:
            print(f"OK {family} {checks}", flush=True)


def main() -> None:
    faulthandler.enable()  # a rank that crashes says where, in the test's output
    dist.init_process_group("gloo")
    check_all(sys.argv[1:] or list(FAMILIES))
    # nothing may hold the group when it goes (end_process_group): a mesh or FSDP model freed only at interpreter exit
    # leaves gloo's threads to free tensors without the GIL, and a rank aborts ("terminate called without an active
    # exception"); a failed check exits with its error instead (a rank left waiting could hang the teardown)
    end_process_group()
    # and none of it may run at interpreter exit: the checks are done and printed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
