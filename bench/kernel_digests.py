"""Digests of the CPU kernels the quickstart's training uses: do two machines compute the same bits?

    python bench/kernel_digests.py              # with this process's kernel settings
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT python bench/kernel_digests.py   # the quickstart's pin

Prints one line per operation (matrix products at the quickstart's shapes, layer norm, softmax,
log-softmax, GELU, scaled dot-product attention, cross-entropy with its gradient, AdamW steps plain and
fused, gradient clipping, dropout's draws, float32 sqrt, exp, cos and sin, cosine similarity, a whole
forward and backward pass of a small BERT and of a small Llama built from configs, and five training
steps of the BERT) with the SHA-256 of its output, on fixed seeded inputs, one thread. The same line on
two machines means the same bits; run it on both with the same packages and the same settings, and
compare (`diff`). `bench/digests/` keeps the lines of machines measured so far, pinned as the quickstart
pins them (`amd-epyc-zen2.txt`: AMD EPYC family 23 model 49, torch 2.13.0; no AVX-512, so native is the same):

    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT python bench/kernel_digests.py \\
        | diff bench/digests/amd-epyc-zen2.txt -
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform

import torch


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def operations() -> dict[str, str]:
    """Each operation's digest, on inputs drawn from one seeded generator (the draws match on every CPU)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    out = {}
    x, w, wv, b = randn(4096, 128), randn(512, 128), randn(2000, 128), randn(512)
    out["matmul 4096x128 @ 128x512"] = digest(x @ w.T)
    out["linear 4096x128 -> 512 (+bias)"] = digest(torch.nn.functional.linear(x, w, b))
    out["linear 4096x128 -> 2000 (vocabulary)"] = digest(torch.nn.functional.linear(x, wv))
    out["layer_norm 4096x128"] = digest(torch.nn.functional.layer_norm(x, (128,)))
    logits = torch.nn.functional.linear(x, wv)
    out["softmax 4096x2000"] = digest(logits.softmax(-1))
    out["log_softmax 4096x2000"] = digest(logits.log_softmax(-1))
    out["gelu 4096x512"] = digest(torch.nn.functional.gelu(x @ w.T))
    q, k, v = randn(32, 4, 128, 32), randn(32, 4, 128, 32), randn(32, 4, 128, 32)
    out["scaled_dot_product_attention 32x4x128x32"] = digest(torch.nn.functional.scaled_dot_product_attention(q, k, v))
    leaf = logits.clone().requires_grad_(True)
    targets = torch.randint(0, 2000, (4096,), generator=g)
    loss = torch.nn.functional.cross_entropy(leaf, targets)
    loss.backward()
    out["cross_entropy 4096x2000 and its gradient"] = digest(loss, leaf.grad)
    start, grad = randn(512, 128), randn(512, 128)
    for label, kw in (("AdamW, 3 steps", {}), ("AdamW fused, 3 steps", {"fused": True})):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kw)
        for _ in range(3):
            opt.step()
        out[label] = digest(p)
    grads = [randn(512, 128), randn(2000, 128), randn(512)]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    out["clip_grad_norm_ (three tensors)"] = digest(norm, *(p.grad for p in params))
    torch.manual_seed(0)
    out["dropout 0.1, 4096x512 (Bernoulli draws)"] = digest(torch.nn.functional.dropout(torch.ones(4096, 512), 0.1))
    sqrt_input = torch.rand(1 << 20, generator=g) * 10
    exact = torch.sqrt(sqrt_input.double()).float()
    off = int((torch.sqrt(sqrt_input) != exact).sum())
    out[f"sqrt float32 ({off} of {1 << 20} not correctly rounded)"] = digest(torch.sqrt(sqrt_input))
    angles = torch.rand(1 << 16, generator=g) * 100
    out["cos and sin float32 (rotary embeddings)"] = digest(angles.cos(), angles.sin())
    out["exp float32"] = digest(torch.exp(randn(1 << 16)))
    out["cosine_similarity 4096x128 (alpha_cos)"] = digest(torch.nn.functional.cosine_similarity(x, randn(4096, 128)))
    out["BERT 4x128 forward and backward"] = _bert_step(dropout=0.0, steps=0)
    out["Llama 2x128 forward and backward"] = _llama_step()
    out["BERT 4x128, dropout 0.1, 5 steps of fused AdamW with clipping"] = _bert_step(dropout=0.1, steps=5)
    return out


def _bert_step(dropout: float, steps: int) -> str:
    """One forward and backward pass (steps=0), or `steps` training steps as run_mlm.py takes them (fused
    AdamW, gradients clipped to norm 1): the digest of the loss and the gradients, or of the weights."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    model = BertForMaskedLM(config)
    g = torch.Generator().manual_seed(1)
    if steps == 0:
        ids = torch.randint(0, 2000, (32, 128), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return digest(loss, *(p.grad for p in model.parameters() if p.grad is not None))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98), fused=True)
    for _ in range(steps):
        ids = torch.randint(0, 2000, (32, 128), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return digest(*model.parameters())


def _llama_step() -> str:
    """A 2-block Llama (RMSNorm, rotary embeddings, SiLU, grouped-query attention): loss and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 2000, (16, 128), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return digest(loss, *(p.grad for p in model.parameters() if p.grad is not None))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"MKL_CBWR={os.environ.get('MKL_CBWR', '')}, {platform.machine()}")
    for name, value in operations().items():
        print(f"{value}  {name}")


if __name__ == "__main__":
    main()
