"""Weight-matrix spectra over training and the grokking summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from dask.base import tokenize

from .._version import RESULTS_REVISION, __version__
from ..devices import resolve_device
from ..errors import HeadCountError
from ..groups import SelectionError, matcher, natural_key, some_names, unmatched_glob
from ..progress import progress_bar
from ..spectra import SPECTRA_OPTIONS
from ..steps import exact_in_float
from ..store import Store, TensorEntry
from ..attributes import describe
from ..threads import torch_threads
from .esd import esd_summary
from .circuits import compute_attention_spectra, model_config
from .grok import compute_qk_grokking, grok_point
from .kernel import matrix_stats, singular_values, split_heads, split_packed
from .layouts import check_count, head_blocks, interleaved_packing
from .streaming import GROUP_BYTES, Scratch, tensor_groups, thetas

__all__ = ["WQ_PATTERNS", "compute_attention_spectra", "compute_grokking", "compute_qk_grokking",
           "compute_weight_spectra", "expert_matrices", "find_wq", "select_weights"]

WQ_PATTERNS = ("*q_proj.weight", "*in_proj_weight[q]", "*query.weight", "*.wq.weight", "*attn.q.weight",
               "*c_attn.weight[q]", "*query_key_value.weight[q]")


def expert_matrices(manifest: Sequence[TensorEntry]) -> list[TensorEntry]:
    """The 2-D tensors, with each stacked mixture-of-experts tensor as its experts' matrices.

    A 3-D tensor whose name contains ``experts`` (``mlp.experts.gate_up_proj``
    of shape (experts, d, d_ff), as recent Hugging Face MoE models store them)
    is E matrices, ``name[expert i]``, each a contiguous slice of it: each is
    rebuilt and decomposed on its own, never the whole stack in float64.
    """
    out = []
    for t in manifest:
        if len(t.shape) == 2:
            out.append(t)
        elif len(t.shape) == 3 and "experts" in t.name:
            experts, rows, cols = t.shape
            size = rows * cols
            out += [TensorEntry(f"{t.name}[expert {e}]", t.offset + e * size, size, (rows, cols), t.dtype)
                    for e in range(experts)]
    return out


def packing_of(store: Store, heads: int | None = None) -> dict[str, int]:
    """The store's tensors packed per head (:func:`~.layouts.interleaved_packing`), with their head count."""
    return interleaved_packing({t.name: tuple(t.shape) for t in store.manifest}, model_config(store), heads,
                               store.path)


def ingest_packing(manifest: Sequence[TensorEntry], config: Mapping, path) -> dict[str, int]:
    """The packing an ingest records its weight spectra with: :func:`packing_of`'s for the model config it
    keeps, or none where the config gives the head count twice (the analysis refuses that config)."""
    try:
        return interleaved_packing({t.name: tuple(t.shape) for t in manifest}, config, origin=str(path))
    except HeadCountError:
        return {}


def select_weights(manifest: Sequence[TensorEntry], match, packing: Mapping[str, int] | None = None
                   ) -> list[tuple[TensorEntry, list[str]]]:
    """2-D tensors (and experts' matrices) to reconstruct, each with the names of the matrices taken from it
    (*packing*: the tensors packed per head, with their head count, split by :func:`split_packed`)."""
    globs = None if match is None else ([match] if isinstance(match, str) else list(match))
    packing = packing or {}
    split = [(t, [n for n, _ in split_packed(t.name, np.broadcast_to(np.False_, t.shape), packing.get(t.name))])
             for t in expert_matrices(manifest)]
    names = [n for t, parts in split for n in (t.name, *parts)]
    if globs is not None and (g := unmatched_glob(names, globs)) is not None:
        raise SelectionError(f"no 2-D weight matches {g!r}, one of the patterns {globs!r} (2-D weights: "
                             f"{some_names([t.name for t, _ in split])})")
    hit = None if globs is None else matcher(names, globs)
    picked = []
    for t, parts in split:
        if hit is not None and not hit(t.name):
            parts = [n for n in parts if hit(n)]
        if parts:
            picked.append((t, parts))
    if not picked:
        shown = some_names([t.name for t in expert_matrices(manifest)]) or "none"
        raise SelectionError(f"no 2-D weight matches {globs!r} (2-D weights: {shown})")
    whole = {id(t) for t in manifest}  # the rest are experts' matrices, name[expert i]
    unique_names([(n, t.name if id(t) in whole else t.name.rsplit("[", 1)[0]) for t, parts in picked for n in parts],
                 {t.name for t in manifest})
    return picked


def unique_names(made: Sequence[tuple[str, str]], tensors: set[str]) -> None:
    """Refuse, in one line, a matrix name made from a tensor (``w[q]``, ``w[expert 0]``, ``w[head 2]``) that
    another matrix has too, or another tensor: its values would be served under the other's name."""
    sources: dict[str, list[str]] = {}
    for name, source in made:
        sources.setdefault(name, []).append(source)
    for name, of in sources.items():
        made_from = [s for s in of if s != name]
        if made_from and (len(of) > 1 or name in tensors):
            other = next((s for s in of if s != made_from[0]), None)
            what = f"tensor {name!r}" if other is None or other == name else f"a matrix made from {other!r}"
            raise SelectionError(f"the matrix {name!r} made from tensor {made_from[0]!r} has the name of {what}: "
                                 "leave one of the two tensors out (exclude=/--exclude)")


def _head_plan(store: Store, picked, heads: int) -> dict[str, tuple[int, int, str]]:
    """How each picked attention projection splits into heads (:func:`~.layouts.head_blocks`); refused in one
    line when none of the picked matrices is one."""
    plan = head_blocks({t.name: tuple(t.shape) for t in store.manifest}, model_config(store), heads, store.path)
    if not any(n in plan for _, parts in picked for n in parts):
        raise SelectionError(f"{store.path}: heads={heads} splits attention projections (W_Q, W_K, W_V, W_O) into "
                             "heads, and none of the matched matrices is one")
    return plan


def compute_weight_spectra(
    store: Store,
    match: str | Sequence[str] | None = None,
    *,
    top: int | None = None,
    heads: int | None = None,
    device: str = "auto",
    cache: bool = True,
    progress: bool = False,
) -> xr.Dataset:
    """Singular values of 2-D weights at every checkpoint; see :meth:`Run.weight_spectra`."""
    check_count("top", top)
    check_count("heads", heads)
    steps = store.checkpoint_steps
    # the model config says how packed attention tensors split into matrices (interleaved_packing); the weight
    # record, whether the singular values are those recorded at ingest (_from_record) or rebuilt from the rows,
    # and what it holds (two stores of the same float32 rows may have recorded other float64 values)
    key = tokenize("weights", match, top, heads, model_config(store), store.weights.info(),
                   store.weights.info() and store.weights.packing(), store.weights.checksums(),
                   store.results_identity, __version__, RESULTS_REVISION)
    name = f"weights-{key[:20]}"
    if cache and (cached := store.read_result(name)) is not None:
        return cached
    manifest = sorted(store.manifest, key=lambda t: t.offset)
    packing = packing_of(store, heads)
    picked = select_weights(manifest, match, packing)
    plan = _head_plan(store, picked, heads) if heads else None
    recorded = _from_record(store, picked, plan, packing)
    if recorded is not None:
        names, sigma = recorded
        frobenius2 = None
        source = "recorded at ingest from the source tensors"
    else:
        # sigma_2 and sigma_3 too, whatever top is: the ratios and gaps do not depend on how many values are kept
        names, sigma, frobenius2 = _reconstruct(store, picked, plan, packing, device, progress,
                                                max(top, 3) if top else None)
        source = "theta_i = base + sum_{k<=i} d_k, float64 accumulation of float32 deltas"
        if not base_is_exact(store):
            source += ("; the float32 base rounds the first checkpoint's float64 weights (each value to 2^-24 of "
                       "itself): record exact values with ingest --weights")
    rank = sigma.shape[-1]
    keep = min(rank, top) if top else rank
    stats = matrix_stats(sigma, frobenius2)
    if not top:  # the ESD summaries need every singular value
        shapes = dict(_matrix_shapes(picked, plan, packing))
        esd = esd_summary(sigma, np.array([shapes[n] for n in names]).reshape(len(names), 2))
        esd["pl_alpha"] = esd.pop("alpha")  # "alpha" is the paper's stability coefficient elsewhere
        stats.update((k, v) for k, v in esd.items() if k != "stable_rank")
    ds = xr.Dataset(
        {
            "sigma": (("step", "matrix", "rank"), sigma[..., :keep]),
            **{k: (("step", "matrix"), v) for k, v in stats.items()},
        },
        coords={"step": steps, "matrix": names, "rank": np.arange(1, keep + 1)},
    )
    ds.attrs = {
        "match": match if isinstance(match, str) else ",".join(match or []),
        "top": top or 0,
        "heads": heads or 0,
        "precision": "float64",
        "source": source,
        "spectral_analyzer_version": __version__,
    }
    ds["sigma"].attrs["description"] = "singular values, descending"
    ds["sigma_ratio_12"].attrs["description"] = "sigma_1 / sigma_2"
    ds["stable_rank"].attrs["description"] = "||W||_F^2 / sigma_1^2"
    describe(ds)
    if cache:
        store.cache_result(name, ds)
    return ds


def base_is_exact(store: Store) -> bool:
    """Whether the store's float32 base holds the first checkpoint exactly: as recorded when the base was
    committed; for a store written before that was recorded, when no tensor came from float64."""
    exact = (store.commit_record or {}).get("base_exact")
    return bool(exact) if exact is not None else all(t.dtype != "float64" for t in store.manifest)


def _matrix_shapes(picked, plan=None, packing=None) -> list[tuple[str, tuple[int, int]]]:
    """Each picked matrix's name and shape, from views of a zero of each tensor's shape (no memory)."""
    zeros = [np.broadcast_to(np.float64(0), (t.size,)) for t, _ in picked]
    return [(n, m.shape) for n, m in matrices_of(picked, zeros, plan, packing)]


def _from_record(store: Store, picked, heads, packing) -> tuple[list[str], np.ndarray] | None:
    """The recorded singular values of the picked matrices, if the ingest recorded them all, split as
    *packing* splits them."""
    record = store.weights.info()
    if record is None or heads:
        return None
    match, matrices, _ = record
    recorded_packing = store.weights.packing()
    try:  # the matrices the ingest recorded for its globs: names that are not those name other columns
        made = [n for n, _ in _matrix_shapes(select_weights(store.manifest, match, recorded_packing), None,
                                             recorded_packing)]
    except SelectionError:
        made = None
    if made != matrices:
        return None
    # the same names for another split of a packed tensor (q as rows [0, E) or as every head's q rows)
    if any(recorded_packing.get(t.name) != packing.get(t.name) for t, _ in picked):
        return None
    wanted = [n for _, parts in picked for n in parts]
    if not set(wanted) <= set(matrices):
        return None
    recorded = store.weights.read()
    # not of this snapshot's rows, or a record of other matrices written meanwhile (an overwrite): rebuilt
    if recorded is None or store.weights.info() != record:
        return None
    sigma = recorded[:, [matrices.index(n) for n in wanted], :]
    width = int(np.max(np.sum(np.isfinite(sigma[0]), axis=-1)))
    return wanted, sigma[..., :width]


def _reconstruct(
    store: Store, picked, plan, packing, device: str, progress: bool, top: int | None = None
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Singular values (the *top* ones, if given) of the picked matrices rebuilt from base + deltas at every
    checkpoint, and with *top* their squared Frobenius norms.

    A group of adjacent tensors at a time (:func:`~.streaming.tensor_groups`),
    each checkpoint's matrices decomposed while the next delta row is read.
    """
    dev = resolve_device(device)
    layout = _matrix_shapes(picked, plan, packing)
    names = [n for n, _ in layout]
    if plan:  # the heads' names (w[head 2]); the rest were checked as picked
        picked_names = {n for _, parts in picked for n in parts}
        unique_names([(n, n if n in picked_names else n[: n.rindex("[")]) for n in names],
                     {t.name for t in store.manifest})
    column = {n: j for j, n in enumerate(names)}
    rank = max(min(shape) for _, shape in layout)
    rank = min(rank, top) if top else rank
    n_steps = store.n_deltas + 1
    sigma = np.full((n_steps, len(names), rank), np.nan)
    frobenius2 = np.zeros((n_steps, len(names)))
    bar = progress_bar(total=n_steps * len(names), desc="weights", unit="matrix", leave=False) if progress else None
    held = _held_bytes(dev)
    pending: list[tuple[int, str, np.ndarray]] = []

    def decompose() -> None:
        if not pending:
            return
        for (k, name, _), values in zip(pending, singular_values([m for _, _, m in pending], dev, top)):
            sigma[k, column[name], : values.size] = values
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    try:
        with torch_threads(None if dev.type == "cpu" else 1):
            scratch = Scratch()  # each group's theta in the same memory: a group is done before the next starts
            for group in tensor_groups([t for t, _ in picked]):
                members = [picked[i] for i in group]
                for k, flats in enumerate(thetas(store, [t for t, _ in members], scratch)):
                    mats = matrices_of(members, flats, plan, packing)
                    if top:  # the full spectrum gives ||W||_F^2 as the sum of sigma_j^2
                        for name, m in mats:
                            frobenius2[k, column[name]] = np.einsum("ij,ij->", m, m)
                    if not held:  # decomposed as they come: the arrays are updated in place for the next step
                        pending += [(k, name, m) for name, m in mats]
                        decompose()
                        continue
                    pending += [(k, name, m.copy()) for name, m in mats]
                    if sum(m.nbytes for _, _, m in pending) >= held:
                        decompose()
                decompose()
    finally:
        if bar is not None:
            bar.close()
    return names, sigma, frobenius2 if top else None


def _held_bytes(device) -> int:
    """Bytes of matrices collected over checkpoints before one batched decomposition: none on cpu (each
    checkpoint as it comes); on a GPU a group's worth, so that every matrix of a shape over many checkpoints
    goes to the device in one batch (capped by device memory in ``singular_values``)."""
    return 0 if device.type == "cpu" else GROUP_BYTES


def matrices_of(picked, flats, plan: Mapping[str, tuple[int, int, str]] | None = None,
                packing: Mapping[str, int] | None = None) -> list[tuple[str, np.ndarray]]:
    """The named matrices of the picked tensors, given each tensor's flat values; with *plan*
    (:func:`~.layouts.head_blocks`) each attention projection in it as its heads."""
    plan, packing = plan or {}, packing or {}
    mats: list[tuple[str, np.ndarray]] = []
    for (t, parts), flat in zip(picked, flats):
        for part_name, m in split_packed(t.name, flat.reshape(t.shape), packing.get(t.name)):
            if part_name in parts:
                mats.extend(split_heads(part_name, m, *plan[part_name]) if part_name in plan else [(part_name, m)])
    return mats


def find_wq(store: Store, wq: str | None) -> str | None:
    """The query matrix the attention analysis uses: the one *wq* (a glob) matches, or the first of the usual
    names; a *wq* that matches several is refused."""
    names = []
    packing = packing_of(store)
    for t in store.manifest:
        if len(t.shape) == 2:
            names += [n for n, _ in split_packed(t.name, np.broadcast_to(np.False_, t.shape), packing.get(t.name))]
    names.sort(key=natural_key)
    hit = matcher(names, [wq] if wq else WQ_PATTERNS)
    hits = [n for n in names if hit(n)]
    if wq and not hits:
        raise SelectionError(f"no weight matrix matches {wq!r}")
    if wq and len(hits) > 1:  # the first of them would be taken in silence ([k] sorts before [q])
        shown = ", ".join(hits[:4]) + (", ..." if len(hits) > 4 else "")
        raise SelectionError(f"{wq!r} matches {len(hits)} weight matrices ({shown}); give the one that is W_Q")
    return hits[0] if hits else None


def compute_grokking(
    store: Store,
    spectra: xr.Dataset,
    metrics: xr.Dataset,
    *,
    metric: str = "test_acc",
    threshold: float = 0.95,
    wq: str | None = None,
    device: str = "auto",
) -> xr.Dataset:
    """The grokking summary of a run; see :meth:`Run.grokking`."""
    grokked, grok_step = grok_point(metrics, metric, threshold, store.path)
    steps = spectra["step"].values
    exact_in_float(steps[[0, -1]] if steps.size else [], store.path, "the grokking summary")  # its peak step
    r = spectra["gap_ratio"].values
    lam = spectra["lambda"].values
    g23 = lam[:, 1] - lam[:, 2] if lam.shape[1] > 2 else np.full(steps.size, np.nan)
    # a grok step past the last checkpoint: no window holds it, so nothing is "at grokking"
    reached = grokked and grok_step <= store.checkpoint_steps[-1]
    if grokked:
        at = np.flatnonzero(steps <= grok_step) if reached else np.array([], dtype=int)
        early = steps < grok_step
        if at.size and np.isfinite(g23[: at[-1] + 1]).any():
            last = at[-1]
            peak = int(np.nanargmax(g23[: last + 1]))
            with np.errstate(divide="ignore", invalid="ignore"):  # g23 of 0 at grokking: inf (0 / 0: NaN)
                decline = g23[peak] / g23[last]
            peak_step, r_grok = int(steps[peak]), r[last]
        elif at.size:  # no g23 (W <= 2): R at grokking all the same
            decline, peak_step, r_grok = np.nan, np.nan, r[at[-1]]
        else:
            decline, peak_step, r_grok = np.nan, np.nan, np.nan
        r_early = float(np.nanmean(r[early])) if (~np.isnan(r[early])).any() else np.nan
    else:
        decline, peak_step, r_grok = np.nan, np.nan, np.nan
        r_early = float(np.nanmean(r)) if (~np.isnan(r)).any() else np.nan
    k = spectra["k_star"].values
    k = k[k > 0]
    k_mode = float(np.bincount(k).argmax()) if k.size else np.nan
    wq_name = find_wq(store, wq)
    wq_grok = wq_end = np.nan
    if wq_name is not None:
        ws = compute_weight_spectra(store, wq_name, device=device)
        ratio = ws["sigma_ratio_12"].sel(matrix=wq_name)
        wq_end = float(ratio.values[-1])
        if reached:
            before = ratio.sel(step=slice(None, grok_step))
            wq_grok = float(before.values[-1]) if before.size else np.nan
    ds = xr.Dataset(
        {
            "grokked": ((), grokked),
            "grok_step": ((), float(grok_step)),  # NaN: never; steps as floats so that NaN can say so
            "g23_decline": ((), float(decline)),
            "g23_peak_step": ((), float(peak_step)),
            "R_early": ((), r_early),
            "R_grok": ((), float(r_grok)),
            "k_star_mode": ((), k_mode),
            "wq_sigma_ratio_grok": ((), wq_grok),
            "wq_sigma_ratio_end": ((), wq_end),
        }
    )
    ds.attrs = {
        "metric": metric,
        "threshold": threshold,
        **{k: spectra.attrs[k] for k in SPECTRA_OPTIONS if k in spectra.attrs},
        "wq": wq_name or "",
        "store": store.path,
        "spectral_analyzer_version": __version__,
    }
    return ds
