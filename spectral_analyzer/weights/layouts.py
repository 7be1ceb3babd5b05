"""Attention layers recognised from tensor names and shapes: where W_Q, W_K, W_V and W_O of each layer are.

Pure functions of names, shapes and arrays; no I/O. Every layout is brought to
one convention, ``nn.Linear``'s (out, in):

* ``W_Q`` (heads * d_head, d_model), ``W_K`` and ``W_V`` (kv_heads * d_head,
  d_model); head h owns rows [h d_head, (h + 1) d_head);
* ``W_O`` (d_model, heads * d_head); head h owns the same columns.

With grouped-query attention (kv_heads < heads) query head h reads key/value
head ``h // (heads / kv_heads)``, as ``transformers``' ``repeat_kv`` does.

Layouts (the layer is the module prefix P its tensors share; names end in
``.weight`` except ``in_proj_weight``):

* ``mha_packed``, ``nn.MultiheadAttention``: ``P.in_proj_weight`` (3E, E),
  rows q, k, v; ``P.out_proj.weight``.
* ``conv1d_packed``, GPT-2's ``Conv1D`` (stored (in, out)): ``P.c_attn``
  (E, 3E), columns q, k, v; ``P.c_proj`` (E, E), also (in, out).
* ``linear_packed``, nanoGPT's ``nn.Linear``: ``P.c_attn`` (3E, E), rows
  q, k, v; ``P.c_proj``. A square ``c_proj`` is told apart from GPT-2's by
  its ``c_attn``.
* ``neox_packed``, GPT-NeoX / Pythia (and BLOOM): ``P.query_key_value``
  (3E, E), rows interleaved per head as [heads, (q, k, v), d_head];
  ``P.dense``. GPT-BigCode's ``P.c_attn`` (3E, E) (``multi_query`` false)
  packs the same way, told apart from nanoGPT's by the config's
  ``model_type`` (a store kept without it reads such a tensor as nanoGPT's).
* ``separate``: ``P.q_proj``, ``k_proj``, ``v_proj`` with ``o_proj``,
  ``out_proj`` or ``dense`` (Llama, Mistral, Qwen, OPT, GPT-J, Phi);
  ``P.self.query``, ``self.key``, ``self.value`` with ``P.output.dense``
  (BERT, RoBERTa); ``q_lin`` ... ``out_lin`` (DistilBERT); ``wq`` ... ``wo``
  (Meta's Llama); ``q`` ... ``o`` (T5).

Rotary position embeddings (Llama, NeoX) rotate q and k by their positions;
the circuits of these layers are those of two tokens at the same position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import HeadCountError, SelectionError
from ..groups import matcher, natural_key, some_names, unmatched_glob

__all__ = ["AttentionLayer", "HEAD_FIELDS", "check_count", "find_attention_layers", "head_blocks", "heads_from_config",
           "interleaved_packing", "projections", "select_layers"]

HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads")  # a model config's head count (all that are set agree)
KV_HEAD_FIELD = "num_key_value_heads"
HEAD_DIM_FIELDS = ("head_dim", "d_kv")  # rows per head, where the config says
WIDTH_FIELDS = ("hidden_size", "n_embd", "d_model")  # the width its attention layers read

# (q, k, v, output candidates): module names under the layer prefix, each followed by ".weight"
SEPARATE = (
    ("q_proj", "k_proj", "v_proj", ("o_proj", "out_proj", "dense")),
    ("self.query", "self.key", "self.value", ("output.dense",)),
    ("q_lin", "k_lin", "v_lin", ("out_lin",)),
    ("wq", "wk", "wv", ("wo",)),
    ("q", "k", "v", ("o",)),
)
# model types whose nn.Linear c_attn (3E, E) interleaves q, k, v per head, as query_key_value does
INTERLEAVED_C_ATTN = ("gpt_bigcode",)
# (query tensor suffix, output tensor suffix, layout): one tensor packs q, k and v
PACKED = (
    ("in_proj_weight", "out_proj.weight", "mha_packed"),
    ("c_attn.weight", "c_proj.weight", "c_attn"),  # conv1d_packed or linear_packed, by shape
    ("query_key_value.weight", "dense.weight", "neox_packed"),
)


@dataclass(frozen=True)
class AttentionLayer:
    """Where one attention layer's projections are, and its head geometry.

    ``q``, ``k``, ``v``, ``o`` are tensor names (the same name for packed
    q, k, v); ``query`` names W_Q as :meth:`Run.weight_spectra` does
    (``...in_proj_weight[q]`` for a packed tensor).
    """

    name: str
    layout: str
    q: str
    k: str
    v: str
    o: str
    query: str
    heads: int
    kv_heads: int
    d_head: int
    d_model: int

    @property
    def tensors(self) -> tuple[str, ...]:
        """The distinct tensors the layer reads, in q, k, v, o order."""
        return tuple(dict.fromkeys((self.q, self.k, self.v, self.o)))


def _count(config: Mapping, key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _agreed(config: Mapping, fields: Sequence[str], what: str, origin: str) -> int | None:
    """The value of *fields* in *config*, all those set agreeing; None if none is set."""
    found = {key: _count(config, key) for key in fields if _count(config, key)}
    if len(set(found.values())) > 1:
        where = f"{origin}: " if origin else ""
        raise HeadCountError(f"{where}the model config gives {what} twice, "
                             f"{' and '.join(f'{k} = {v}' for k, v in found.items())}; pass heads=H (--heads H)")
    return next(iter(found.values()), None)


def check_count(name: str, value) -> None:
    """Refuse a *value* of ``heads=`` or ``top=`` that is neither None nor a whole number of at least 1 (a
    negative head count split nothing and dropped every attention matrix; ``top=-3`` kept no values)."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if value is not None and not (whole and value >= 1):
        raise SelectionError(f"{name} must be a whole number of at least 1 (or None), not {value!r}")


def heads_from_config(config: Mapping, origin: str = "") -> tuple[int | None, int | None]:
    """(heads, kv_heads) from a model config: :data:`HEAD_FIELDS` (refused where two of them disagree), and
    ``num_key_value_heads``."""
    return _agreed(config, HEAD_FIELDS, "the number of heads", origin), _count(config, KV_HEAD_FIELD)


def _under(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _prefix(name: str, suffix: str) -> str | None:
    """The module prefix of *name* if it ends in *suffix* (whole dotted parts), else None."""
    if name == suffix:
        return ""
    return name[: -len(suffix) - 1] if name.endswith("." + suffix) else None


def _candidates(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(layer, layout, q, k, v, o, query) for every set of tensors that looks like one attention layer."""
    found: dict[str, tuple[str, str, str, str, str, str, str]] = {}
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        for q_suffix, o_suffix, layout in PACKED:
            prefix = _prefix(name, q_suffix)
            o = None if prefix is None else _under(prefix, o_suffix)
            if o is None or prefix in found or len(shapes.get(o, ())) != 2:
                continue
            if layout == "c_attn":
                if shape[1] == 3 * shape[0]:
                    layout = "conv1d_packed"
                elif shape[0] == 3 * shape[1]:
                    layout = "linear_packed"
                else:
                    continue
            found[prefix] = (prefix, layout, name, name, name, o, f"{name}[q]")
        for q, k, v, outputs in SEPARATE:
            prefix = _prefix(name, f"{q}.weight")
            if prefix is None or prefix in found:
                continue
            k_name, v_name = _under(prefix, f"{k}.weight"), _under(prefix, f"{v}.weight")
            o = next((_under(prefix, f"{o}.weight") for o in outputs if _under(prefix, f"{o}.weight") in shapes), None)
            if o is not None and len(shapes.get(k_name, ())) == 2 and len(shapes.get(v_name, ())) == 2:
                found[prefix] = (prefix, "separate", name, k_name, v_name, o, name)
    return [found[p] for p in sorted(found, key=natural_key)]


def select_layers(layers: Sequence[AttentionLayer], globs: str | Sequence[str] | None, where: str = ""
                  ) -> list[AttentionLayer]:
    """The layers whose name or query matrix matches a glob (exactly, as a glob, or with ``[`` taken literally;
    a glob that is a layer's or query's name picks that one alone); one of several globs that matches none is
    refused (*where*: the store, to name in the message)."""
    if globs is None:
        return list(layers)
    globs = [globs] if isinstance(globs, str) else list(globs)
    names = [n for layer in layers for n in (layer.name, layer.query)]
    if (g := unmatched_glob(names, globs)) is not None:
        raise SelectionError(f"{where}no attention layer matches {g!r}, one of the patterns {globs!r} (layers: "
                             f"{some_names([layer.name for layer in layers])})")
    hit = matcher(names, globs)
    return [layer for layer in layers if hit(layer.name) or hit(layer.query)]


def find_attention_layers(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    heads: int | None = None,
    config: Mapping | None = None,
    match: str | Sequence[str] | None = None,
    origin: str = "",
) -> list[AttentionLayer]:
    """The attention layers among tensors of the given shapes, in natural order of their names.

    Parameters
    ----------
    shapes : mapping of tensor name to shape
    heads : int, optional
        Query heads per layer; overrides the config (``heads=1`` gives each
        layer's whole W_Q^T W_K as one head).
    config : mapping, optional
        The model's config (``config.json`` fields): heads from
        ``num_attention_heads``, ``n_head`` or ``num_heads``; with
        ``num_key_value_heads`` checked against the shapes.
    match : glob or list of globs, optional
        Only the layers whose name (the module prefix) or query matrix matches.
    origin : str
        The store or folder named in error messages.

    Returns
    -------
    list of AttentionLayer
        kv_heads is read off the shapes: rows of W_K / d_head, d_head = rows of W_Q / heads.

    Raises
    ------
    SelectionError
        No layer is recognised or matched, or a layer's tensors do not fit together.
    HeadCountError
        The head count is unknown or does not divide a projection.

    Examples
    --------
    >>> shapes = {"l.attn.in_proj_weight": (96, 32), "l.attn.out_proj.weight": (32, 32)}
    >>> [(a.name, a.layout, a.heads, a.d_head) for a in find_attention_layers(shapes, heads=4)]
    [('l.attn', 'mha_packed', 4, 8)]
    """
    config = config or {}
    where = f"{origin}: " if origin else ""
    found = _candidates(shapes)
    if config.get("model_type") in INTERLEAVED_C_ATTN:
        found = [(c[0], "neox_packed", *c[2:]) if c[1] == "linear_packed" else c for c in found]
    if _sequential_qkv(config):  # rows q, k, v one after another, as nanoGPT's c_attn
        found = [(c[0], "linear_packed", *c[2:]) if c[1] == "neox_packed" else c for c in found]
    if not found:
        raise SelectionError(f"{where}no attention layer recognised (looked for in_proj_weight, c_attn, "
                             "query_key_value, q_proj/k_proj/v_proj, self.query/key/value and their outputs)")
    chosen = select_layers([AttentionLayer(*c[:7], 0, 0, 0, 0) for c in found], match, where)
    if not chosen:
        raise SelectionError(f"{where}no attention layer matches {match!r} (layers: "
                             f"{some_names([c[0] for c in found])})")
    if heads:
        return [_geometry(layer, shapes, heads, {}, where) for layer in chosen]
    n_heads, config_kv = heads_from_config(config, origin)
    if n_heads is None:
        raise HeadCountError(
            f"{where}the number of heads of '{chosen[0].query}' is unknown: the store keeps no model config with "
            f"{', '.join(HEAD_FIELDS)}; pass heads=H (--heads H)")
    # what else the config says of the geometry, checked against each layer's shapes: a layer of another
    # width (a second tower: a vision encoder beside the language model) has heads the config does not give
    said = {"kv_heads": config_kv, "d_head": _agreed(config, HEAD_DIM_FIELDS, "the rows per head", origin),
            "width": _agreed(config, WIDTH_FIELDS, "the model's width", origin)}
    return [_geometry(layer, shapes, n_heads, said, where) for layer in chosen]


def _geometry(layer: AttentionLayer, shapes, heads: int, said: Mapping[str, int | None], where: str
              ) -> AttentionLayer:
    """*layer* with heads, kv_heads, d_head and d_model, checked against the shapes of its tensors and against
    what the model config *said* (``kv_heads``, ``d_head``, ``width``; empty when the head count was given)."""
    q_shape, k_shape, v_shape, o_shape = (tuple(shapes[n]) for n in (layer.q, layer.k, layer.v, layer.o))
    if layer.layout == "conv1d_packed":
        q_rows = k_rows = q_shape[1] // 3
        d_model, o_shape = q_shape[0], o_shape[::-1]
    elif layer.layout != "separate":
        if q_shape[0] % 3:
            raise SelectionError(f"{where}'{layer.q}' has {q_shape[0]} rows, not three equal q, k, v blocks")
        q_rows = k_rows = q_shape[0] // 3
        d_model = q_shape[1]
    else:
        q_rows, k_rows, d_model = q_shape[0], k_shape[0], q_shape[1]
        for name, shape in ((layer.k, k_shape), (layer.v, v_shape)):
            if shape[1] != d_model or shape[0] != k_rows:
                raise SelectionError(f"{where}'{name}' has shape {shape}, which does not fit '{layer.q}' "
                                     f"{q_shape} and '{layer.k}' {k_shape} as one attention layer")
    width = said.get("width")
    if width is not None and d_model != width:
        raise HeadCountError(f"{where}'{layer.query}' reads {d_model} features where the model config's width is "
                             f"{width}: a layer whose head count the config does not give; leave it out with "
                             f"match= or give its heads=H (--heads H)")
    if q_rows % heads:
        raise HeadCountError(f"{where}'{layer.query}' has {q_rows} rows, which do not split into {heads} heads; "
                             f"give the model's head count (a divisor of {q_rows})")
    d_head = q_rows // heads
    if said.get("d_head") is not None and said["d_head"] != d_head:
        raise HeadCountError(f"{where}'{layer.query}' has {q_rows} rows: {heads} heads of {d_head} rows, but the "
                             f"model config says {said['d_head']} rows per head; pass heads=H (--heads H)")
    kv_heads = k_rows // d_head
    if k_rows % d_head or not kv_heads or heads % kv_heads:
        raise HeadCountError(f"{where}'{layer.k}' has {k_rows} rows: not a whole number of key/value heads of "
                             f"{d_head} rows that {heads} query heads share in equal groups")
    if said.get("kv_heads") is not None and said["kv_heads"] != kv_heads:
        raise HeadCountError(f"{where}'{layer.k}' has {kv_heads} key/value heads of {d_head} rows, but the model "
                             f"config says num_key_value_heads = {said['kv_heads']}")
    if o_shape != (d_model, q_rows):
        raise SelectionError(f"{where}'{layer.o}' has shape {tuple(shapes[layer.o])}, which is not the output "
                             f"projection of '{layer.query}' ({d_model} x {q_rows} as (out, in))")
    return AttentionLayer(layer.name, layer.layout, layer.q, layer.k, layer.v, layer.o, layer.query,
                          heads, kv_heads, d_head, d_model)


def _sequential_qkv(config: Mapping) -> bool:
    """Whether the model's ``query_key_value`` packs [q | k | v] one after another: ChatGLM2 and 3 with
    ``multi_query_attention`` true. Without it (ChatGLM-6B, whose config has no such flag, and ChatGLM2 and 3
    with it false: their ``SelfAttention`` views the projection as (heads, 3 d_head)) q, k and v are
    interleaved per head, as GPT-NeoX's."""
    return config.get("model_type") == "chatglm" and config.get("multi_query_attention") is True


def interleaved_packing(shapes: Mapping[str, tuple[int, ...]], config: Mapping | None,
                        heads: int | None = None, origin: str = "") -> dict[str, int]:
    """The tensors that pack q, k and v interleaved per head, each with its head count (*heads*, else the
    config's): GPT-NeoX's and BLOOM's ``query_key_value`` and, for GPT-BigCode, ``c_attn``, both (3E, E).

    Left out (and kept whole by :func:`split_packed`): a tensor whose head count is unknown or does not divide
    it; one of another shape (Falcon's grouped [kv group, (q heads, k, v), d], ChatGLM2's [q | k | v] with
    fewer key/value heads); ChatGLM2's of any shape; and, with the config's head count, one of another width than the
    config's (a second tower). A config that gives the head count twice, differently, is refused.
    """
    config = config or {}
    bigcode = config.get("model_type") in INTERLEAVED_C_ATTN
    sequential = _sequential_qkv(config)
    candidates = [
        (name, shape) for name, shape in shapes.items()
        if len(shape) == 2 and shape[0] == 3 * shape[1] and (
            (not sequential and _prefix(name, "query_key_value.weight") is not None)
            or (bigcode and _prefix(name, "c_attn.weight") is not None))
    ]
    if not candidates:
        return {}
    n = heads or heads_from_config(config, origin)[0]
    width = None if heads else _agreed(config, WIDTH_FIELDS, "the model's width", origin)
    if not n:
        return {}
    return {name: n for name, shape in candidates if shape[0] % (3 * n) == 0 and width in (None, shape[1])}


def head_blocks(shapes: Mapping[str, tuple[int, ...]], config: Mapping | None, heads: int, origin: str = ""
                ) -> dict[str, tuple[int, int, str]]:
    """How :meth:`Run.weight_spectra` splits each attention projection into heads: matrix name (as
    :func:`split_packed` names it) -> (blocks, axis, label), the arguments of :func:`split_heads`.

    W_Q into *heads* row blocks; W_K and W_V into their key/value heads (fewer under grouped-query
    attention: ``kv head g``, shared by query heads g * heads / kv_heads ...); W_O into the column blocks
    each head writes through (rows for GPT-2's ``Conv1D`` ``c_proj``, stored (in, out)). The geometry is
    :func:`find_attention_layers`'s, read off the shapes with *heads* query heads.
    """
    out: dict[str, tuple[int, int, str]] = {}
    for layer in find_attention_layers(shapes, heads=heads, config=config, origin=origin):
        packed = layer.layout != "separate"
        kv = "head" if layer.kv_heads == layer.heads else "kv head"
        out[f"{layer.q}[q]" if packed else layer.q] = (layer.heads, 0, "head")
        out[f"{layer.k}[k]" if packed else layer.k] = (layer.kv_heads, 0, kv)
        out[f"{layer.v}[v]" if packed else layer.v] = (layer.kv_heads, 0, kv)
        out[layer.o] = (layer.heads, 0 if layer.layout == "conv1d_packed" else 1, "head")
    return out


def projections(layer: AttentionLayer, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(W_Q, W_K, W_V, W_O) of *layer* in ``nn.Linear``'s (out, in) convention (views where possible).

    *values* maps each of ``layer.tensors`` to its array in the tensor's own shape.

    Examples
    --------
    >>> layer = find_attention_layers({"a.in_proj_weight": (6, 2), "a.out_proj.weight": (2, 2)}, heads=1)[0]
    >>> w = np.arange(12.0).reshape(6, 2)
    >>> [m.shape for m in projections(layer, {"a.in_proj_weight": w, "a.out_proj.weight": np.eye(2)})]
    [(2, 2), (2, 2), (2, 2), (2, 2)]
    """
    q_rows, k_rows = layer.heads * layer.d_head, layer.kv_heads * layer.d_head
    if layer.layout == "separate":
        return values[layer.q], values[layer.k], values[layer.v], values[layer.o]
    packed, out = values[layer.q], values[layer.o]
    if layer.layout == "conv1d_packed":  # x @ W: columns [0, E) are q, [E, 2E) k, [2E, 3E) v
        return packed[:, :q_rows].T, packed[:, q_rows : 2 * q_rows].T, packed[:, 2 * q_rows :].T, out.T
    if layer.layout == "neox_packed":  # rows [h, (q, k, v), d_head]
        per_head = packed.reshape(layer.heads, 3, layer.d_head, layer.d_model)
        return (*(per_head[:, i].reshape(q_rows, layer.d_model) for i in range(3)), out)
    return packed[:q_rows], packed[q_rows : q_rows + k_rows], packed[q_rows + k_rows :], out
