"""QK and OV circuit spectra of every attention head at every checkpoint, from the store."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from dask.base import tokenize

from .._version import RESULTS_REVISION, __version__
from ..attributes import describe
from ..devices import resolve_device
from ..store import Store
from ..threads import one_thread_each, torch_threads
from .attention import circuit_spectra
from .kernel import aligned
from .layouts import AttentionLayer, check_count, find_attention_layers, projections
from .streaming import thetas

__all__ = ["compute_attention_spectra", "model_config"]


def model_config(store: Store) -> dict:
    """The model config fields kept at ingest (head counts, widths); empty for a store made without one."""
    config = store.attrs.get("provenance", {}).get("model_config", {})
    return dict(config) if isinstance(config, dict) else {}


def compute_attention_spectra(
    store: Store,
    layer: str | Sequence[str] | None = None,
    *,
    heads: int | None = None,
    device: str = "auto",
    cache: bool = True,
) -> xr.Dataset:
    """QK and OV circuit spectra of every head of the attention layers; see :meth:`Run.attention_spectra`."""
    check_count("heads", heads)
    config = model_config(store)
    key = tokenize("attention", layer, heads, config, store.results_identity, __version__, RESULTS_REVISION)
    name = f"attention-{key[:20]}"
    if cache and (cached := store.read_result(name)) is not None:
        return cached
    shapes = {t.name: tuple(t.shape) for t in store.manifest}
    layers = find_attention_layers(shapes, heads=heads, config=config, match=layer, origin=store.path)
    values = _circuits(store, layers, device)
    ds = _dataset(store.checkpoint_steps, layers, values)
    ds.attrs = {
        "layer": layer if isinstance(layer, str) else ",".join(layer or []),
        "heads": heads or 0,
        "heads_source": "argument" if heads else "model config",
        "precision": "float64",
        "source": "theta_i = base + sum_{k<=i} d_k, float64 accumulation of float32 deltas",
        "method": "per head, in the d_head space: sigma(A^T B) = sigma(R_A R_B^T) (QR of A^T, B^T); "
                  "nonzero eigenvalues of W_Q^T W_K = eigenvalues of W_K W_Q^T",
        "spectral_analyzer_version": __version__,
    }
    describe(ds)
    if cache:
        store.cache_result(name, ds)
    return ds


def _circuits(store: Store, layers: list[AttentionLayer], device: str) -> dict[str, np.ndarray]:
    """qk_sigma, qk_eig (complex) and ov_sigma (step, layer, head, rank), NaN-padded; layers of one shape batched."""
    dev = resolve_device(device)
    by_name = {t.name: t for t in store.manifest}
    names = sorted(dict.fromkeys(n for layer in layers for n in layer.tensors), key=lambda n: by_name[n].offset)
    shapes: dict[tuple[int, int, int, int], list[int]] = {}
    for i, a in enumerate(layers):
        shapes.setdefault((a.heads, a.kv_heads, a.d_head, a.d_model), []).append(i)
    size = (len(store.checkpoint_steps), len(layers), max(a.heads for a in layers), max(a.d_head for a in layers))
    out = {"qk_sigma": np.full(size, np.nan), "qk_eig": np.full(size, np.nan, dtype=complex),
           "ov_sigma": np.full(size, np.nan)}
    with torch_threads(None if dev.type == "cpu" else 1):
        for s, flats in enumerate(thetas(store, [by_name[n] for n in names])):
            tensors = {n: flat.reshape(by_name[n].shape) for n, flat in zip(names, flats)}
            for (h, g, d, _), members in shapes.items():

                def spectra(part: list[int], h=h, g=g) -> dict[str, np.ndarray]:
                    mats = [projections(layers[i], tensors) for i in part]
                    stacked = [aligned(np.stack([m[j] for m in mats])).to(dev) for j in range(4)]
                    return {k: v.cpu().numpy() for k, v in circuit_spectra(*stacked, heads=h, kv_heads=g).items()}

                # on the cpu one layer per torch thread at a time (QR of many small blocks: 1.6x faster so
                # than batched on 2 threads; a layer's factors at a time, not a stack of all layers'); on a
                # GPU the layers of a shape in one batch
                parts = [[i] for i in members] if dev.type == "cpu" else [members]
                for part, values in zip(parts, one_thread_each(spectra, parts)):
                    for key, value in values.items():
                        out[key][s, part, :h, : value.shape[-1]] = value  # rank min(d_head, d_model)
    return out


def _dataset(steps: np.ndarray, layers: list[AttentionLayer], values: dict[str, np.ndarray]) -> xr.Dataset:
    """The labelled result, with |lambda_j|, arg lambda_j and the per-head ratio and gap derived."""
    dims = ("step", "layer", "head", "rank")
    eig = values["qk_eig"]
    modulus = np.abs(eig)
    rank = modulus.shape[-1]
    nan = np.full(modulus.shape[:-1], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = modulus[..., 0] / modulus[..., 1] if rank > 1 else nan
    gap = modulus[..., 1] - modulus[..., 2] if rank > 2 else nan
    ds = xr.Dataset(
        {
            "qk_sigma": (dims, values["qk_sigma"]),
            "qk_eig_abs": (dims, modulus),
            "qk_eig_phase": (dims, np.angle(eig)),
            "ov_sigma": (dims, values["ov_sigma"]),
            "qk_ratio_12": (dims[:3], ratio),
            "qk_gap_23": (dims[:3], gap),
        },
        coords={
            "step": steps,
            "layer": [a.name for a in layers],
            "head": np.arange(modulus.shape[2]),
            "rank": np.arange(1, rank + 1),
            "layout": ("layer", [a.layout for a in layers]),
            "query": ("layer", [a.query for a in layers]),
            "n_heads": ("layer", np.array([a.heads for a in layers], dtype=np.int64)),
            "n_kv_heads": ("layer", np.array([a.kv_heads for a in layers], dtype=np.int64)),
            "d_head": ("layer", np.array([a.d_head for a in layers], dtype=np.int64)),
        },
    )
    return ds
