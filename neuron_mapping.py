"""Neuron-mapping (`.nm`) files: which teacher activations align with which student activations.

A file is JSON::

    {"interchange_variable_mappings": [
        {"teacher_variable_names": ["$L:6$H:[0:12]$[0:64]"],
         "student_variable_names": ["$L:3$H:[0:12]$[0:64]"]}, ...]}

A variable name is ``$L:<l>$H:<h>$[<d0>:<d1>]``. ``<l>`` and ``<h>`` are an index or a half-open
range ``[a:b]`` (a range stands for every layer or head in it). The site is the OUTPUT of
transformer block ``l`` (0-based), hidden dimensions ``h*head_dim + d0`` up to ``h*head_dim + d1``.

``head_dim`` here is always ``hidden_size / num_attention_heads``: ``$H:`` cuts the residual stream
into ``num_attention_heads`` equal slices, whatever the attention's own ``head_dim`` or number of
key/value heads (a Llama-layout config may set ``head_dim`` to anything, and grouped-query
attention has fewer key/value heads).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from utils import CliError

_INDEX_OR_RANGE = r"(\d+|\[\d+:\d+\])"
_NAME = re.compile(rf"^\$L:{_INDEX_OR_RANGE}\$H:{_INDEX_OR_RANGE}\$\[(\d+):(\d+)\]$")


@dataclass(frozen=True)
class ModelShape:
    """What a mapping is validated against: depth, width and heads of one model."""

    n_layers: int
    hidden_size: int
    n_heads: int

    @property
    def head_dim(self) -> int:
        """Width of one `$H:` slice of the residual stream: hidden_size / n_heads (not the attention's head_dim)."""
        return self.hidden_size // self.n_heads


# A site set: block index -> sorted tuple of hidden dimensions written/read at that block's output.
Sites = dict[int, tuple[int, ...]]


@dataclass(frozen=True)
class MappingEntry:
    """One aligned pair of variable sets; the sites are merged per layer."""

    index: int
    teacher: Sites
    student: Sites
    teacher_names: tuple[str, ...]
    student_names: tuple[str, ...]


def _span(text: str, name: str, what: str) -> range:
    if text.startswith("["):
        a, b = (int(x) for x in text[1:-1].split(":"))
        if a >= b:
            raise ValueError(f"empty {what} range [{a}:{b}] in {name!r}")
        return range(a, b)
    return range(int(text), int(text) + 1)


def parse_variable_name(name: str, shape: ModelShape) -> Sites:
    """Parse one variable name into {layer: dims}, checked against `shape`. Raises ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"variable name must be a string, got {name!r}")
    m = _NAME.match(name.strip())
    if m is None:
        raise ValueError(f"malformed variable name {name!r}: expected $L:<l>$H:<h>$[<d0>:<d1>]")
    layers = _span(m.group(1), name, "layer")
    heads = _span(m.group(2), name, "head")
    d0, d1 = int(m.group(3)), int(m.group(4))
    if layers.stop > shape.n_layers:
        raise ValueError(f"layer {layers.stop - 1} in {name!r} is out of range: the model has {shape.n_layers} layers")
    if shape.hidden_size % shape.n_heads:
        raise ValueError(f"{name!r} uses $H: slices, but hidden_size {shape.hidden_size} is not a multiple of "
                         f"num_attention_heads {shape.n_heads}")
    if heads.stop > shape.n_heads:
        raise ValueError(f"head {heads.stop - 1} in {name!r} is out of range: the model has {shape.n_heads} heads")
    if not 0 <= d0 < d1 <= shape.head_dim:
        raise ValueError(
            f"dimension range [{d0}:{d1}] in {name!r} is out of range: a $H: slice of the residual stream has "
            f"{shape.head_dim} dimensions (hidden_size {shape.hidden_size} / {shape.n_heads} heads)"
        )
    dims = sorted({h * shape.head_dim + d for h in heads for d in range(d0, d1)})
    return {layer: tuple(dims) for layer in layers}


def _merge(parts: list[Sites]) -> Sites:
    merged: dict[int, set[int]] = {}
    for part in parts:
        for layer, dims in part.items():
            merged.setdefault(layer, set()).update(dims)
    return {layer: tuple(sorted(dims)) for layer, dims in sorted(merged.items())}


# The shipped training_configs/*.nm assume a 12-layer BERT-base teacher; a mapping that does not fit the models at
# hand is most often one of those.
MAKE_MAPPING_HINT = ("A mapping must fit the teacher's and the student's depth, heads and width (the shipped "
                     "training_configs/*.nm fit a 12-layer BERT-base teacher): write one for these models with "
                     "scripts/make_mapping.py --teacher T --student S --alignment extracted|middle|late|full --output F.nm")


def load_neuron_mapping(path: str | Path, teacher: ModelShape, student: ModelShape) -> list[MappingEntry]:
    """Read and validate a `.nm` file against the loaded models' shapes.

    Raises CliError naming the file, the mapping entry and the variable at fault.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--neuron_mapping: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"--neuron_mapping: cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise CliError(f"neuron mapping {path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("interchange_variable_mappings"), list):
        raise CliError(f"neuron mapping {path}: expected an object with a list 'interchange_variable_mappings'")
    entries = raw["interchange_variable_mappings"]
    if not entries:
        raise CliError(f"neuron mapping {path}: 'interchange_variable_mappings' is empty")
    out = []
    for i, entry in enumerate(entries):
        where = f"neuron mapping {path}, entry {i}"
        if not isinstance(entry, dict):
            raise CliError(f"{where}: expected an object with teacher_variable_names and student_variable_names")
        sides = {}
        for side, shape in (("teacher", teacher), ("student", student)):
            names = entry.get(f"{side}_variable_names")
            if not isinstance(names, list) or not names:
                raise CliError(f"{where}: '{side}_variable_names' must be a non-empty list")
            parts = []
            for name in names:
                try:
                    parts.append(parse_variable_name(name, shape))
                except ValueError as err:
                    raise CliError(f"{where}, {side} variable {name!r}: {err}. {MAKE_MAPPING_HINT}") from None
            sides[side] = (_merge(parts), tuple(names))
        t_sites, t_names = sides["teacher"]
        s_sites, s_names = sides["student"]
        out.append(MappingEntry(i, t_sites, s_sites, t_names, s_names))
    return out
