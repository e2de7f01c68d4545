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
from dataclasses import dataclass, field
from functools import partial
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

from batching import Prepared
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


# --- the runs of one training or evaluation step -------------------------------------------------
@dataclass
class Needs:
    """Which outputs the active losses use, so nothing else is computed."""

    logits: bool
    hidden: bool
    cf_logits: bool
    cf_hidden: bool
    teacher_logits: bool

    @property
    def causal(self) -> bool:
        return self.cf_logits or self.cf_hidden


@dataclass
class Outputs:
    """What one model produced for one prepared batch, gathered at the selected rows.

    The LM head is applied up to its vocabulary projection only: the losses project chunk by
    chunk (`losses.head_losses`), so no (rows x vocabulary) logits are kept.
    """

    projection: nn.Linear | None = None  # the vocabulary projection of the model's LM head
    features: torch.Tensor | None = None  # (N, H) head features at logit_idx
    hidden: torch.Tensor | None = None  # (R, H) last hidden states at real_idx
    cf_features: torch.Tensor | None = None
    cf_hidden: torch.Tensor | None = None
    forwards: dict = field(default_factory=dict)  # run name -> count (for tests and logs)

    def logits(self, counterfactual: bool = False) -> torch.Tensor:
        """Materialised (N, V) logits (only the `mse` loss needs them)."""
        return self.projection(self.cf_features if counterfactual else self.features)


def model_outputs(
    model: nn.Module,
    p: Prepared,
    sites: dict[int, torch.Tensor] | None,
    needs: Needs,
    *,
    want_logits: bool,
    data_augment: bool = False,
    shared_prefix: bool = True,
) -> Outputs:
    """Run base, and when `sites` is given, source and counterfactual runs of `model` on `p`.

    sites: block -> (D,) dims tensor of this model's variables for the step's mapping entry.
    """
    out = Outputs(projection=head_projection(model))
    causal = sites is not None and needs.causal
    layers = sorted(sites) if causal else []
    prefix = causal and shared_prefix and not data_augment
    base_last, base_sites = run_model(model, p.input_ids, p.attention_mask, capture=(layers[0],) if prefix else ())
    out.forwards["base"] = 1
    hidden_size = base_last.shape[-1]
    flat = base_last.reshape(-1, hidden_size)
    if want_logits:
        out.features = head_features(model, flat.index_select(0, p.logit_idx))
    if needs.hidden:
        out.hidden = flat.index_select(0, p.real_idx)
    if not causal:
        return out

    if data_augment:
        tokens = p.source_ids[p.batch_idx, p.source_pos]
        cf_ids = p.input_ids.index_put((p.batch_idx, p.base_pos), tokens)
        cf_last, _ = run_model(model, cf_ids, p.attention_mask)
    else:
        _, source_sites = run_model(
            model, p.source_ids, p.source_mask, capture=tuple(layers),
            stop_after=layers[-1] if shared_prefix else None,
        )
        out.forwards["source"] = 1
        write = {
            layer: partial(
                interchange, source=source_sites[layer], dims=sites[layer],
                batch_idx=p.batch_idx, base_pos=p.base_pos, source_pos=p.source_pos,
            )
            for layer in layers
        }
        if prefix:
            lowest = layers[0]
            start = (lowest, write[lowest](base_sites[lowest]))
            upper = {layer: fn for layer, fn in write.items() if layer != lowest}
            cf_last, _ = run_model(model, p.input_ids, p.attention_mask, writes=upper, start_after=start)
        else:
            cf_last, _ = run_model(model, p.input_ids, p.attention_mask, writes=write)
    out.forwards["counterfactual"] = 1
    cf_flat = cf_last.reshape(-1, hidden_size)
    if needs.cf_logits:
        out.cf_features = head_features(model, cf_flat.index_select(0, p.logit_idx))
    if needs.cf_hidden:
        out.cf_hidden = cf_flat.index_select(0, p.real_idx)
    return out
