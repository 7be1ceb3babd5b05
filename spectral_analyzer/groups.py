"""Tensor selection and grouping by name: glob subsets, layers, module kinds."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from .errors import SelectionError

__all__ = ["GROUPINGS", "SelectionError", "group_tensors", "layer_of", "module_of", "name_matches", "natural_key",
           "select_tensors"]

GROUPINGS = ("tensor", "layer", "module")


def natural_key(text: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    # isdecimal, not isdigit: "1²" splits into "1", "²", and "²".isdigit() but int("²") fails
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", text)]


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_NORM = re.compile(r"norm|^(?:ln|bn)(?:_?[a-z0-9]+)?$")
# module names, lower-cased, of each kind; a name's kind is that of its part nearest the root that names one
# (T5's DenseReluDense.wo is an MLP's though wo alone is Meta Llama's attention output)
_ATTENTION = {
    "attn", "attention", "self_attn", "self_attention", "cross_attn", "selfattention", "encdecattention", "att",
    "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "in_proj", "out_proj", "c_attn", "qkv",
    "wq", "wk", "wv", "wo",
}
_MLP = {
    "mlp", "ffn", "feed_forward", "feedforward", "densereludense", "fc1", "fc2", "c_fc", "gate_proj", "up_proj",
    "down_proj", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "wi", "wi_0", "wi_1", "intermediate",
}
_EMBEDDING = {
    "embed", "embedding", "embeddings", "wte", "wpe", "embed_tokens", "tok_embeddings", "word_embeddings",
    "position_embeddings", "pos_embed", "pos", "token_embedding", "embed_positions", "embed_in", "patch_embed",
    "patch_embedding",
    # the unembedding (tied to the embedding in many models)
    "lm_head", "embed_out", "unembed", "output_embeddings",
}
_OTHER = {"mixer"}  # a state-space model's mixer (Mamba: in_proj, out_proj are not attention)
_KINDS = (("attention", _ATTENTION), ("mlp", _MLP), ("embedding", _EMBEDDING), ("other", _OTHER))
_PARAM = {"weight", "bias", "in_proj_weight", "in_proj_bias", "w", "b"}  # w, b: TransformerLens's LayerNorm


def name_matches(name: str, glob: str) -> bool:
    """*name* is *glob*, matches it, or matches it with ``[`` taken literally (``*in_proj_weight[q]``)."""
    return name == glob or fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(name, glob.replace("[", "[[]"))


def matcher(names: Iterable[str], globs: Sequence[str]) -> Callable[[str], bool]:
    """Whether a name is one of those *globs* pick among *names*: a glob that is one of the names picks that
    name alone (``w[1]``, not ``w1``), any other one what :func:`name_matches` finds."""
    names = set(names)
    exact = {g for g in globs if g in names}
    others = [g for g in globs if g not in exact]
    return lambda name: name in exact or any(name_matches(name, g) for g in others)


def unmatched_glob(names: Sequence[str], globs: Sequence[str]) -> str | None:
    """The first of several *globs* that picks none of *names* (:func:`matcher`), refused by every selection:
    a typo in a list would narrow the selection in silence. None for a single glob (its caller says none
    matched) or when every glob picks a name."""
    if len(globs) < 2:
        return None
    return next((g for g in globs if not any(map(matcher(names, [g]), names))), None)


def some_names(names: Sequence[str], width: int = 200) -> str:
    """*names* joined by ", ", whole names only, as many as fit *width* characters, then "and N more".

    >>> some_names(["layers.9.attn", "layers.10.attn", "layers.11.attn"], width=30)
    'layers.9.attn, layers.10.attn and 1 more'
    """
    shown: list[str] = []
    for name in names:
        if shown and len(", ".join([*shown, name])) > width:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _matched(names: Sequence[str], glob: str) -> set[int]:
    """The tensors *glob* names (:func:`matcher`)."""
    hit = matcher(names, [glob])
    return {i for i, n in enumerate(names) if hit(n)}


def select_tensors(names: Sequence[str], params: str | Sequence[str] | None) -> list[int]:
    """Indices of the tensors whose name matches any of the globs in *params* (all when None); a glob that
    matches no tensor is refused (a typo in a list would narrow the selection in silence)."""
    if params is None:
        return list(range(len(names)))
    globs = [params] if isinstance(params, str) else list(params)
    if not globs:
        raise SelectionError("params is an empty list; give None for every tensor")
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    hits = [_matched(names, g) for g in globs]
    if not any(hits):
        raise SelectionError(f"no tensor matches {', '.join(map(repr, globs))} (tensors: {shown})")
    if (g := unmatched_glob(names, globs)) is not None:
        raise SelectionError(f"no tensor matches {g!r}, one of the patterns {globs!r} (tensors: {shown})")
    return sorted(set().union(*hits))


def layer_of(name: str) -> str:
    """``layers.3.mlp.fc1.weight`` -> ``layer 3``; names with no layer index -> ``other``."""
    m = _LAYER.search(name)
    return f"layer {m.group(1)}" if m else "other"  # the digits as written: layers.01 is not layers.1


def module_of(name: str) -> str:
    """One of embedding / attention / mlp / norm / other, from the name's parts.

    A norm is recognised by the module that owns the parameter (``ln_1``,
    ``input_layernorm``, ``norm``, TransformerLens's ``ln1.w``); attention,
    MLP and embedding by the part nearest the root that names one
    (``layer.1.DenseReluDense.wo``: MLP; ``layers.1.attention.wo``:
    attention), BERT's ``layer.N.output`` being its MLP's output. The
    unembedding (``lm_head``, GPT-NeoX's ``embed_out``) counts as embedding:
    many models tie the two, as T5's ``shared`` is.
    """
    parts = name.split(".")
    owner_parts = [p for p in parts if p not in _PARAM and not p.isdigit()]
    owner = owner_parts[-1] if owner_parts else ""
    if _NORM.search(owner.lower()):
        return "norm"
    lowered = [p.lower() for p in parts]
    if lowered[0] == "shared" and len(parts) == 2:  # T5's token embedding, shared by encoder and decoder
        return "embedding"
    for i, part in enumerate(lowered):
        if part == "output" and i and lowered[i - 1].isdigit():  # BERT's layer.N.output: the MLP's down-projection
            return "mlp"
        for kind, words in _KINDS:
            if part in words:
                return kind
    return "attention" if parts[-1].startswith("in_proj") else "other"


def _layer_labels(names: Sequence[str]) -> list[str]:
    """Each name's layer, ``layer N``; where the model has several stacks of layers (an encoder and a decoder,
    a vision tower beside a language model), ``<stack> layer N``: their layers N are not one layer."""
    found = [_LAYER.search(n) for n in names]
    stacks = {n[: m.start()] for n, m in zip(names, found) if m}
    return [
        "other" if m is None else f"{n[: m.start()] + ' ' if len(stacks) > 1 and m.start() else ''}layer {m[1]}"
        for n, m in zip(names, found)
    ]


def group_tensors(names: Sequence[str], indices: Sequence[int], group_by: str) -> dict[str, list[int]]:
    """Groups of tensor indices, in first-seen order. Grouping by layer where no name has a layer index is
    refused: it would be one group, the ungrouped spectrum."""
    if group_by not in GROUPINGS:
        raise SelectionError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUPINGS)}")
    if group_by == "layer":
        labels = dict(zip((names[i] for i in indices), _layer_labels([names[i] for i in indices])))
        if set(labels.values()) == {"other"}:
            shown = ", ".join(list(labels)[:4]) + (", ..." if len(labels) > 4 else "")
            raise SelectionError(f"no tensor name has a layer index (layers.N, layer.N, h.N, blocks.N, block.N; "
                                 f"tensors: {shown}); group by tensor or module")
        key = labels.__getitem__
    else:
        key = {"tensor": lambda n: n, "module": module_of}[group_by]
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(key(names[i]), []).append(i)
    return groups
