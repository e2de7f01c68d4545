"""Interchange interventions on stock HuggingFace models, through forward hooks.

A *site* is the output of transformer block `layer` restricted to some hidden dimensions. One
function reads a site (`run_model(..., capture=...)` keeps block outputs), one writes it
(`interchange`, applied by a forward hook at the same block's output).

`run_model` can also run a slice of the stack: stop after a block (the source run of DIITO needs
nothing above its deepest site), or start above a block from a given activation (the
counterfactual run shares the base run's computation below its lowest site). Slicing swaps the
block list for the duration of the call and replaces the output of the module that feeds block 0
(the embeddings), so the stock forward (masks, positions) runs unchanged. Rotary positions (the
Llama layout) are computed by the base model from position ids, not by the entry module, so they
stay right in a sliced run; config lists indexed by block (`Family.per_block_config`) are sliced
with the blocks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from neuron_mapping import ModelShape


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its parts. One row per family; no if-chains elsewhere."""

    name: str
    model_class: type
    config_class: type
    backbone: str  # attribute of the LM model holding the base model
    blocks: str  # attribute of the base model holding the block list (dotted)
    entry: str  # module of the base model whose output is block 0's input (dotted)
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (lm model, hidden) -> input of the projection
    projection: str  # dotted path of the vocabulary projection (an nn.Linear) in the LM model
    mlm: bool  # masked LM (True) or causal LM (False)
    position_embeddings: str | None  # dotted path from the LM model (for --freeze_pos_embs); None: rotary
    token_type_embeddings: str | None  # dotted path from the LM model (for --freeze_token_type_embds)
    # Config lists indexed by block number inside the base model's forward (Qwen2's `layer_types`
    # picks each block's attention mask): sliced together with the block list.
    per_block_config: tuple[str, ...] = ()


def _distilbert_features(model, hidden):
    return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))


def _roberta_features(model, hidden):
    head = model.lm_head
    return head.layer_norm(torch.nn.functional.gelu(head.dense(hidden)))


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", BertForMaskedLM, BertConfig, "bert", "encoder.layer", "embeddings",
                   lambda m, h: m.cls.predictions.transform(h), "cls.predictions.decoder", True,
                   "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"),
    "roberta": Family("roberta", RobertaForMaskedLM, RobertaConfig, "roberta", "encoder.layer", "embeddings",
                      _roberta_features, "lm_head.decoder", True,
                      "roberta.embeddings.position_embeddings", "roberta.embeddings.token_type_embeddings"),
    "distilbert": Family("distilbert", DistilBertForMaskedLM, DistilBertConfig, "distilbert", "transformer.layer",
                         "embeddings", _distilbert_features, "vocab_projector", True,
                         "distilbert.embeddings.position_embeddings", None),
    "gpt2": Family("gpt2", GPT2LMHeadModel, GPT2Config, "transformer", "h", "drop",
                   lambda m, h: h, "lm_head", False,
                   "transformer.wpe", None),
}

# The Llama layout (transformers 5): `model.embed_tokens` -> `model.layers` (pre-norm blocks, rotary
# positions computed from position ids at model level) -> `model.norm` (inside the base model, so
# its last hidden state is already normalised) -> `lm_head` (no bias, tied or not). One row each.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "smollm3")
_LLAMA_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
                  "olmo2": "Olmo2", "smollm3": "SmolLM3"}
for _name in LLAMA_LAYOUT:
    _prefix = _LLAMA_CLASSES[_name]
    FAMILIES[_name] = Family(_name, getattr(transformers, f"{_prefix}ForCausalLM"),
                             getattr(transformers, f"{_prefix}Config"), "model", "layers", "embed_tokens",
                             lambda m, h: h, "lm_head", False, None, None, per_block_config=("layer_types",))
CAUSAL_FAMILIES = tuple(name for name, fam in FAMILIES.items() if not fam.mlm)


def family_of(model: nn.Module) -> Family:
    """The Family row of a loaded model (by its config's model_type)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def model_shape(model: nn.Module) -> ModelShape:
    c = model.config
    return ModelShape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads)


def get_submodule(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def interchange(
    base: torch.Tensor,
    source: torch.Tensor,
    dims: torch.Tensor,
    batch_idx: torch.Tensor,
    base_pos: torch.Tensor,
    source_pos: torch.Tensor,
) -> torch.Tensor:
    """Write `source[b, source_pos, dims]` into a copy of `base` at `[b, base_pos, dims]`.

    `base`, `source`: (batch, length, hidden) activations of one site; `dims`: (D,) hidden
    dimensions; `batch_idx`, `base_pos`, `source_pos`: (N,) aligned positions. Differentiable with
    respect to both activations; everything else of `base` passes through unchanged.
    """
    rows = batch_idx[:, None]
    values = source[rows, source_pos[:, None], dims[None, :]]
    return base.index_put((rows, base_pos[:, None], dims[None, :]), values)


@contextlib.contextmanager
def _hooks(modules_and_fns):
    handles = [m.register_forward_hook(fn) for m, fn in modules_and_fns]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    capture: tuple[int, ...] = (),
    writes: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stop_after: int | None = None,
    start_after: tuple[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """Run the base model of an LM (no vocabulary head) with interventions.

    capture: blocks whose outputs are returned (reading a site).
    writes: block -> function applied to that block's output (writing a site).
    stop_after: run blocks 0..stop_after only; the last hidden state is then not returned.
    start_after: (layer, activation): skip the embeddings and blocks 0..layer, using `activation`
        as block `layer`'s output.
    Returns (last hidden state (batch, length, hidden) or None, {block: output}).
    """
    fam = family_of(model)
    base = getattr(model, fam.backbone)
    blocks = get_submodule(base, fam.blocks)
    n = len(blocks)
    lo = 0 if start_after is None else start_after[0] + 1
    hi = n if stop_after is None else stop_after + 1
    captured: dict[int, torch.Tensor] = {}

    def capture_hook(layer):
        def hook(module, args, output):
            captured[layer] = _first(output)

        return hook

    def write_hook(fn):
        def hook(module, args, output):
            return _replace_first(output, fn(_first(output)))

        return hook

    hooks = []
    for layer, fn in (writes or {}).items():
        if lo <= layer < hi:
            hooks.append((blocks[layer], write_hook(fn)))
    for layer in capture:  # after writes: a captured site is what the block finally emits
        if lo <= layer < hi:
            hooks.append((blocks[layer], capture_hook(layer)))
    if start_after is not None:
        activation = start_after[1]
        hooks.append((get_submodule(base, fam.entry), lambda module, args, output: activation))

    sliced = lo > 0 or hi < n
    config = base.config
    per_block = {k: getattr(config, k) for k in fam.per_block_config if isinstance(getattr(config, k, None), list)}
    if sliced:
        _set(base, fam.blocks, nn.ModuleList(list(blocks)[lo:hi]))
        for k, values in per_block.items():
            setattr(config, k, values[lo:hi])
    # Causal LMs: no key/value cache (nothing is generated; a cache would only hold memory).
    kwargs = {} if fam.mlm else {"use_cache": False}
    try:
        with _hooks(hooks):
            out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        if sliced:
            _set(base, fam.blocks, blocks)
            for k, values in per_block.items():
                setattr(config, k, values)
    last = None if stop_after is not None and hi < n else out.last_hidden_state
    return last, captured


def head_features(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head up to (not including) the vocabulary projection: (..., hidden) -> (..., hidden)."""
    return family_of(model).features(model, hidden)


def head_projection(model: nn.Module) -> nn.Linear:
    """The vocabulary projection of the LM head (weight (V, H), bias (V,) or None)."""
    return get_submodule(model, family_of(model).projection)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's vocabulary head to hidden states of any leading shape."""
    return head_projection(model)(head_features(model, hidden))
