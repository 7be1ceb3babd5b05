"""The few fields of a model's ``config.json`` the analysis needs (head counts, widths), kept in provenance.

A transformers checkpoint folder holds ``config.json`` beside its weights;
the attention-circuit spectra need the head count, which the weights' shapes
do not tell. Only positive integer fields named in :data:`FIELDS` are kept.
A missing, unreadable, oversized or malformed ``config.json`` is no error:
the run is ingested as before, and the head count must then be given.
``model_type`` is kept beside them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "FLAGS", "MAX_BYTES", "attention_config", "read_model_config"]

FIELDS = (
    "num_attention_heads",  # BERT, Llama, GPT-NeoX, ...
    "n_head",  # GPT-2
    "num_heads",  # T5 and others
    "num_key_value_heads",  # grouped-query attention (Llama 2 70B, Mistral, ...)
    "head_dim",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
)
# boolean fields that tell packings apart: ChatGLM2 and 3 pack [q | k | v] one after another where
# ChatGLM-6B interleaves them per head
FLAGS = ("multi_query_attention",)
MAX_BYTES = 1 << 20  # a config.json is a few kB; a larger file is not one


def attention_config(config: Mapping[str, Any]) -> dict[str, int | str | bool]:
    """The positive integer :data:`FIELDS` of *config* (booleans are not integers here), its boolean
    :data:`FLAGS`, and its ``model_type`` (a short name of letters, digits, ``_`` and ``-``: it tells packings apart that shapes
    cannot, such as GPT-BigCode's ``c_attn`` from nanoGPT's).

    Examples
    --------
    >>> attention_config({"n_head": 12, "n_embd": 768, "activation_function": "gelu_new", "use_cache": True,
    ...                   "model_type": "gpt2"})
    {'n_head': 12, 'n_embd': 768, 'model_type': 'gpt2'}
    """
    out: dict[str, int | str | bool] = {
        k: v for k in FIELDS if isinstance(v := config.get(k), int) and not isinstance(v, bool) and v > 0
    }
    kind = config.get("model_type")
    if isinstance(kind, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", kind):
        out["model_type"] = kind
    for flag in FLAGS:
        if isinstance(config.get(flag), bool):
            out[flag] = config[flag]
    return out


def read_model_config(folders: Sequence[Path]) -> dict[str, int | str]:
    """:func:`attention_config` of the first readable ``config.json`` among *folders*; empty if none."""
    for folder in folders:
        path = Path(folder) / "config.json"
        try:
            if not path.is_file() or path.stat().st_size > MAX_BYTES:
                continue
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(config, dict):
            return attention_config(config)
    return {}
