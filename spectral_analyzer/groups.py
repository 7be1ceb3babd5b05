"""Tensor selection and grouping by name: glob subsets, layers, module kinds."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from .errors import SelectionError

__all__ = ["GROUPINGS", "SelectionError", "group_tensors", "layer_of", "module_of", "natural_key", "select_tensors"]

GROUPINGS = ("tensor", "layer", "module")


def natural_key(text: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    # isdecimal, not isdigit: "1²" splits into "1", "²", and "²".isdigit() but int("²") fails
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", text)]


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_NORM = re.compile(r"norm|^(?:ln|bn)(?:_?[a-z0-9]+)?$")
_ATTENTION = {
    "attn", "attention", "self_attn", "self_attention", "cross_attn", "q_proj", "k_proj", "v_proj", "o_proj",
    "query", "key", "value", "in_proj", "out_proj", "c_attn", "qkv", "wq", "wk", "wv", "wo",
}
_MLP = {
    "mlp", "ffn", "feed_forward", "feedforward", "fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj",
    "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "intermediate",
}
_EMBEDDING = {
    "embed", "embedding", "embeddings", "wte", "wpe", "embed_tokens", "tok_embeddings", "word_embeddings",
    "position_embeddings", "pos_embed", "pos", "token_embedding", "embed_positions", "embed_in",
    # the unembedding (tied to the embedding in many models)
    "lm_head", "embed_out", "unembed", "output_embeddings",
}
_PARAM = {"weight", "bias", "in_proj_weight", "in_proj_bias"}


def select_tensors(names: Sequence[str], params: str | Sequence[str] | None) -> list[int]:
    """Indices of the tensors whose name matches any of the globs in *params* (all when None)."""
    if params is None:
        return list(range(len(names)))
    globs = [params] if isinstance(params, str) else list(params)
    picked = [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not picked:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise SelectionError(f"no tensor matches {', '.join(map(repr, globs))} (tensors: {shown})")
    return picked


def layer_of(name: str) -> str:
    """``layers.3.mlp.fc1.weight`` -> ``layer 3``; names with no layer index -> ``other``."""
    m = _LAYER.search(name)
    return f"layer {int(m.group(1))}" if m else "other"


def module_of(name: str) -> str:
    """One of embedding / attention / mlp / norm / other, from the name's parts.

    A norm is recognised by the module that owns the parameter (``ln_1``,
    ``input_layernorm``, ``norm``); attention, MLP and embedding by any part
    of the path. The unembedding (``lm_head``, GPT-NeoX's ``embed_out``) counts
    as embedding: many models tie the two.
    """
    parts = name.split(".")
    owner_parts = [p for p in parts if p not in _PARAM and not p.isdigit()]
    owner = owner_parts[-1] if owner_parts else ""
    if _NORM.search(owner.lower()):
        return "norm"
    lowered = [p.lower() for p in parts]
    if any(p in _ATTENTION for p in lowered) or parts[-1].startswith("in_proj"):
        return "attention"
    if any(p in _MLP for p in lowered):
        return "mlp"
    if any(p in _EMBEDDING for p in lowered):
        return "embedding"
    return "other"


def group_tensors(names: Sequence[str], indices: Sequence[int], group_by: str) -> dict[str, list[int]]:
    """Groups of tensor indices, in first-seen order."""
    if group_by not in GROUPINGS:
        raise SelectionError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUPINGS)}")
    key = {"tensor": lambda n: n, "layer": layer_of, "module": module_of}[group_by]
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(key(names[i]), []).append(i)
    return groups
