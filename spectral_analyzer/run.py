"""A training run as stored: steps, tensors, deltas and metrics as xarray objects."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dask.array as da
from dask.base import tokenize
import numpy as np
import xarray as xr

from .attributes import describe
from .errors import SelectionError
from .dynamics import compute_dynamics
from .dynamics.coupling import correlate
from .gram.build import DEFAULT_MAX_LAG, build_band
from .spectra import compute_spectra
from .store import Store
from .weights import compute_attention_spectra, compute_grokking, compute_qk_grokking, compute_weight_spectra, find_wq
from .weights.grok import grok_point

__all__ = ["Run", "open_run"]


class Run:
    """One ingested training run.

    Attributes are read from the store's commit record, so only committed
    deltas are ever visible.

    Examples
    --------
    >>> import spectral_analyzer as sa
    >>> run = sa.open_run("spectral.zarr")        # doctest: +SKIP
    >>> run.deltas.sel(step=run.steps[-1])        # doctest: +SKIP
    """

    def __init__(self, store: Store, client=None):
        self._store = store
        self.client = client

    def _options(self, options: dict) -> dict:
        """*options* with the run's dask.distributed client as the default scheduler."""
        if self.client is not None:
            options.setdefault("scheduler", self.client)
        return options

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def store(self) -> Store:
        return self._store

    @property
    def steps(self) -> np.ndarray:
        """End step of each delta, shape (n_deltas,)."""
        return self._store.steps

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """Step of every checkpoint, the base included, shape (n_deltas + 1,)."""
        return self._store.checkpoint_steps

    @property
    def n_deltas(self) -> int:
        return self._store.n_deltas

    @property
    def n_params(self) -> int:
        """Length p of the flattened parameter vector."""
        return self._store.n_params

    @property
    def tensors(self) -> xr.Dataset:
        """The tensor manifest along ``tensor``: offset, size, shape (a tuple of ints), ndim and source dtype."""
        manifest = self._store.manifest
        shapes = np.empty(len(manifest), dtype=object)
        shapes[:] = [tuple(t.shape) for t in manifest]
        return describe(xr.Dataset(
            {
                "offset": ("tensor", np.array([t.offset for t in manifest], dtype=np.int64)),
                "size": ("tensor", np.array([t.size for t in manifest], dtype=np.int64)),
                "shape": ("tensor", shapes),
                "ndim": ("tensor", np.array([len(t.shape) for t in manifest], dtype=np.int64)),
                "dtype": ("tensor", np.array([t.dtype for t in manifest])),
            },
            coords={"tensor": [t.name for t in manifest]},
        ))

    @property
    def metrics(self) -> xr.Dataset:
        """Logged series (loss, accuracy, learning rate...) indexed by ``step``.

        A series named ``step`` (kept by stores ingested before such a series
        was left out at ingest: a log of the step itself) is not among them:
        ``step`` is the index.
        """
        steps, series = self._store.read_metrics()
        return describe(xr.Dataset({k: ("step", v) for k, v in series.items() if k != "step"}, coords={"step": steps}))

    def delta(self, tensor: str) -> xr.DataArray:
        """Lazy (dask) float32 deltas of one tensor, dims (step, dim_0, dim_1, ...) in its own shape.

        Examples
        --------
        >>> run.delta("layers.0.attn.in_proj_weight").isel(step=-1).values   # doctest: +SKIP
        """
        entry = next((t for t in self._store.manifest if t.name == tensor), None)
        if entry is None:
            raise SelectionError(f"{self.path}: no tensor {tensor!r} in the store (see run.tensors)")
        arr = _checked(self._store, "deltas")[:, entry.offset : entry.offset + entry.size]
        if entry.size == 0:  # dask reshapes no zero-size array into dimensions it does not merge or split
            import dask.array as da

            arr = da.zeros((self.n_deltas, *entry.shape), dtype=arr.dtype)
        else:
            arr = arr.reshape((self.n_deltas, *entry.shape))
        dims = ("step", *(f"dim_{i}" for i in range(len(entry.shape))))
        return xr.DataArray(arr, dims=dims, coords={"step": self.steps}, name=tensor)

    @property
    def deltas(self) -> xr.DataArray:
        """Lazy (dask) float32 deltas, dims (step, param), committed rows only."""
        arr = _checked(self._store, "deltas")
        return xr.DataArray(arr, dims=("step", "param"), coords={"step": self.steps}, name="deltas")

    @property
    def base(self) -> xr.DataArray:
        """theta at the first checkpoint (float32), dim ``param``."""
        return xr.DataArray(_checked(self._store, "base"), dims=("param",), name="base")

    def band(self, max_lag: int = DEFAULT_MAX_LAG, **options) -> xr.DataArray:
        """The per-tensor band ``b_T[i, l] = <d_i[T], d_{i-l}[T]>`` (tensor, step, lag), float64.

        Built in one pass over the deltas on first use and cached in the
        store; later calls (any window W <= L, any subset) read no delta.
        Options: ``device``, ``scheduler``, ``progress``, ``memory_limit``.
        """
        band, lag = build_band(self._store, max_lag, **self._options(options))
        ds = xr.Dataset(
            {"band": (("tensor", "step", "lag"), band)},
            coords={"tensor": [t.name for t in self._store.manifest], "step": self.steps, "lag": np.arange(lag + 1)},
        )
        return describe(ds)["band"]

    def spectra(
        self,
        window: int = 10,
        *,
        params: str | list[str] | None = None,
        group_by: str | None = None,
        center: bool = False,
        stride: int = 1,
        steps: slice | tuple | str | None = None,
        **options,
    ) -> xr.Dataset:
        """Spectra of every window of *window* consecutive deltas.

        For the window ending at delta i, G_i = X_i X_i^T is read off the
        cached band, and its eigenvalues give ``sigma``, ``lambda``, ``ratio``
        (mode), and per window ``k_star``, ``gap_ratio`` (R), ``gap``,
        ``k95``, ``k_star_weighted``, ``p_value`` (against Wishart noise of
        the same W and p, sampled by Bartlett), ``nu``, ``d_crit``, ``margin``
        (the BBP check), with ``null_q95`` the noise floor of R.

        Parameters
        ----------
        window : int
            W >= 2, at most the number of deltas.
        params : glob or list of globs, optional
            Only the tensors whose names match.
        group_by : {"tensor", "layer", "module"}, optional
            One spectrum per group, along a ``group`` dim.
        center : bool
            Use H G H, H = I - 11^T / W.
        stride : int
            Distance between the ends of consecutive windows.
        steps : slice, (first, last) or "A..B", optional
            Only the deltas between the checkpoints at steps A..B (both
            included, either end open): ``slice(1000, None)`` leaves out
            Pythia's log-spaced early steps. Windows are formed within them.
        **options
            ``interval_factor`` (default 2: a :class:`MixedIntervalsWarning`,
            once, when a window's deltas span step intervals differing by
            more than this factor; None: no check), ``max_lag``,
            ``null_draws``, ``device``, ``scheduler``, ``progress``, ``cache``
            (False: this result is computed afresh and not stored; the band
            under it is still taken from the store's band cache, whose rows
            are checked against the store's generation).

        Returns
        -------
        xarray.Dataset
            coords ``step`` (end step of the window's last delta), ``mode``
            (1..W) and ``group`` when grouped.

        Examples
        --------
        >>> ds = run.spectra(window=10)                        # doctest: +SKIP
        >>> ds.k_star.to_series().value_counts()               # doctest: +SKIP
        >>> run.spectra(window=10, group_by="layer").gap_ratio # doctest: +SKIP
        >>> run.spectra(window=10, steps=slice(1000, 143000))  # doctest: +SKIP
        """
        ds = compute_spectra(
            self._store, window, params=params, group_by=group_by, center=center, stride=stride, steps=steps,
            **self._options(options),
        )
        return ds

    def dynamics(self, window: int = 10, **options) -> xr.Dataset:
        """How the spectrum moves from one window to the next, from the cached band alone.

        For each window i with a predecessor (step = end step of delta i):

        * ``alpha`` (step, mode): Davis-Kahan stability
          ``clip(1 - C ||dC_i||_F / dlambda_j, 0, 1)`` with the exact norm of the
          rank-two update ``dC_i = d_i d_i^T - d_{i-W} d_{i-W}^T`` (``dC_norm``);
          ``alpha_halves``: ``|<v_j^(1), v_j^(2)>|`` between the window's halves.
        * ``overlap`` (step, mode_prev, mode): ``<v_j(i-1), v_k(i)>``;
          ``rotation`` = arccos |O_jj|; ``tracked_from`` the previous mode each mode
          continues (best overlap, through level crossings) and
          ``rotation_tracked``; ``principal_angle`` (step, k): the largest principal
          angle between the top-k subspaces of consecutive windows, k = 1 .. top_k.
        * flow: ``lambda_change`` observed, ``flow_entering`` - ``flow_exiting`` =
          ``flow_first`` (Hellmann-Feynman), ``flow_second`` = ``flow_repulsion`` +
          ``flow_outside`` (the rest of R^p), ``flow_residual``; ``gap_change``;
          ``adiabatic`` A = ||dC||_F / (eta g^2) with eta = ``lr``.
        * ``energy`` (step, mode, group): share of mode j carried by each group.
        * events along ``event`` (``event_step``, ``event_kind``, ``event_mode``,
          ``event_value``) and ``phase`` (rise / plateau / collapse) of R(t).

        Parameters
        ----------
        window : int
        **options
            ``params`` (globs), ``group_by`` ("module", "layer" or "tensor") for
            the energy, ``constant`` (C, default 1), ``lr`` (else the metrics'
            learning rate), ``top_k`` (3), ``tau`` (1.2), ``factor`` (relative
            collapse, off by default), ``persistence`` (2 windows),
            ``phase_fraction`` (0.8), ``steps`` (a step range, as for
            :meth:`spectra`), ``interval_factor`` (2), ``max_lag``,
            ``device``, ``scheduler``, ``progress``, ``cache``.

        Examples
        --------
        >>> dyn = run.dynamics(window=10, factor=2.0)            # doctest: +SKIP
        >>> sa.events_table(dyn)                                 # doctest: +SKIP
        """
        return compute_dynamics(self._store, window, **self._options(options))

    def correlate(self, metric: str, window: int = 10, **options) -> xr.Dataset:
        """Lagged correlation of the gap ratio (and each ratio_j) with a logged metric.

        ``r(l) = corr(x_t, y_{t+l})`` of the detrended series, l in windows
        (l > 0: the spectrum leads); options ``max_lag`` (10), ``detrend``
        ("linear", "cubic" or "none"), and the spectra's ``params``,
        ``steps``, ``stride`` and ``center`` (see :meth:`spectra`). See
        :func:`spectral_analyzer.dynamics.coupling.correlate`.

        Examples
        --------
        >>> run.correlate("eval_loss", window=10, max_lag=10).best_lag   # doctest: +SKIP
        """
        own = {k: options.pop(k) for k in ("max_lag", "detrend") if k in options}
        unknown = sorted(set(options) - {"params", "steps", "stride", "center"})
        if unknown:
            raise SelectionError(f"correlate: unknown option {unknown[0]!r} (options: max_lag, detrend, params, "
                                 "steps, stride, center)")
        spectra = self.spectra(window=window, **options)
        return describe(correlate(spectra, self.metrics, metric, max_lag=own.get("max_lag", 10),
                                  detrend_kind=own.get("detrend", "linear"), origin=self._store.path))

    def weight_spectra(self, match: str | list[str] | None = None, **options) -> xr.Dataset:
        """Singular values of 2-D weight matrices at every checkpoint.

        Each selected weight is reconstructed as ``theta_i = base + sum_{k<=i} d_k``
        with float64 accumulation and decomposed with torch (batched by shape),
        each checkpoint's matrices while the next checkpoint's deltas are read.
        A packed attention ``in_proj_weight`` becomes three matrices,
        ``...in_proj_weight[q]``, ``[k]`` and ``[v]`` (nn.MultiheadAttention's
        own row blocks). Memory: the weights are rebuilt a group of adjacent
        tensors at a time, 8 bytes per parameter of at most 256 MiB of
        parameters (or of the largest tensor, if larger), plus two delta rows
        of the group in float32; not the whole model. Cached per store
        generation.

        Parameters
        ----------
        match : glob or list of globs, optional
            On tensor names or on the split matrix names; all 2-D weights by default.
        **options
            ``top`` (keep the top singular values), ``heads`` (each attention
            projection as its heads: W_Q's row blocks, W_K's and W_V's key/value
            heads, W_O's column blocks; other matrices whole), ``device``,
            ``cache``, ``progress`` (a bar over checkpoints x matrices).

        Returns
        -------
        xarray.Dataset
            ``sigma`` (step, matrix, rank) and per (step, matrix)
            ``sigma_ratio_12`` (sigma1/sigma2), ``g12``, ``g23``, ``stable_rank``
            (||W||_F^2 / sigma1^2); ``step`` covers every checkpoint, base included.

        Examples
        --------
        >>> run.weight_spectra("*in_proj_weight[q]").sigma_ratio_12   # doctest: +SKIP
        """
        return compute_weight_spectra(self._store, match, **options)

    def attention_spectra(
        self, layer: str | list[str] | None = None, *, heads: int | None = None, **options
    ) -> xr.Dataset:
        """QK and OV circuit spectra of every attention head at every checkpoint.

        For head h of a layer, with W_Q^h, W_K^h, W_V^h its (d_head, d_model)
        row blocks of the projections and W_O^h its column block of the output
        projection:

        * QK circuit W_QK^h = W_Q^h^T W_K^h (d_model x d_model, rank <=
          d_head): the score of query token x for key token y is x^T W_QK^h y;
        * OV circuit W_OV^h = W_O^h W_V^h (d_model x d_model, rank <= d_head).

        Both are decomposed in the d_head-dimensional space, never formed:
        singular values of A^T B are those of R_A R_B^T (QR of A^T and B^T),
        and the nonzero eigenvalues of W_QK^h are those of W_K^h W_Q^h^T.
        Cost per head and checkpoint O(d_model d_head^2 + d_head^3), in float64,
        batched over heads and over layers of one shape; each attention tensor
        is rebuilt as ``theta_i = base + sum_{k<=i} d_k`` row by row (memory:
        8 bytes per attention parameter).

        Layers are recognised by name (``nn.MultiheadAttention``'s
        ``in_proj_weight``, GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``,
        Llama's ``q_proj`` ..., BERT's ``self.query`` ...; see
        :mod:`spectral_analyzer.weights.layouts`), with grouped-query attention.
        For rotary models the circuits are those of two tokens at one position.

        Parameters
        ----------
        layer : glob or list of globs, optional
            Only the layers whose name (module prefix, e.g. ``layers.0.attn``)
            or query matrix (``layers.0.attn.in_proj_weight[q]``) matches.
        heads : int, optional
            Query heads per layer. By default from the model config kept at
            ingest (``num_attention_heads``, ``n_head`` or ``num_heads`` of the
            checkpoints' ``config.json``); a store without one needs it
            (:class:`~spectral_analyzer.HeadCountError` otherwise). Key/value
            heads are read off the shapes.
        **options
            ``device``, ``cache``.

        Returns
        -------
        xarray.Dataset
            ``qk_sigma``, ``ov_sigma``, ``qk_eig_abs`` (|lambda_j|) and
            ``qk_eig_phase`` (arg lambda_j) over (step, layer, head, rank),
            eigenvalues sorted by modulus, descending; per (step, layer, head)
            ``qk_ratio_12`` = |lambda_1| / |lambda_2| and ``qk_gap_23`` =
            |lambda_2| - |lambda_3|. Layer coordinates ``layout``, ``query``,
            ``n_heads``, ``n_kv_heads``, ``d_head``. NaN pads layers with fewer
            heads or a smaller d_head. Cached in the store.

        Examples
        --------
        >>> att = run.attention_spectra(heads=4)                                  # doctest: +SKIP
        >>> att.qk_gap_23.sel(layer="layers.0.attn").plot.line(x="step")         # doctest: +SKIP
        >>> lam = att.qk_eig_abs * np.exp(1j * att.qk_eig_phase)                  # doctest: +SKIP
        """
        return compute_attention_spectra(self._store, layer, heads=heads, **options)

    def grokking(
        self, metric: str = "test_acc", threshold: float = 0.95, window: int = 10, *, operator: str = "trajectory",
        **options
    ) -> xr.Dataset:
        """The grokking summary: did the run grok, when, and what the spectrum did before.

        ``operator="trajectory"`` (the default) summarises the window Gram of
        the parameter updates; ``operator="qk"`` the eigenvalues of the QK
        circuits, as the paper does for modular arithmetic (below).

        * ``grokked``, ``grok_step``: the first logged step where *metric*
          reaches *threshold* (NaN if never).
        * ``g23_decline``: the trajectory gap g23 = lambda_2 - lambda_3 at its
          pre-grok peak (``g23_peak_step``) over g23 at the last window ending at
          or before the grok step.
        * ``R_early``: mean gap ratio over windows ending before the grok step
          (over all windows for a run that never groks); ``R_grok``: R at the
          grok step.
        * ``k_star_mode``: the most frequent k* (NaN where k* is never defined).
        * ``wq_sigma_ratio_grok``, ``wq_sigma_ratio_end``: sigma1/sigma2 of W_Q
          (the first of ``*q_proj.weight``, ``*in_proj_weight[q]``, ... or
          ``wq=GLOB``) at grokking and at the last checkpoint.

        Options: ``params`` (for the spectra), ``wq``, ``device``.

        With ``operator="qk"``, per head of one attention layer (the first, in
        natural order of names, or the first whose name or query matrix
        matches ``wq``) and from the checkpoints, with |lambda_j| the moduli
        of the eigenvalues of W_QK^h (:meth:`attention_spectra`); *window* is
        not used:

        * ``grokked``, ``grok_step`` as above;
        * ``qk_gap_23_decline``: the sub-leading gap |lambda_2| - |lambda_3|
          at its peak over the checkpoints up to the grok step
          (``qk_gap_23_peak_step``) over its value at the last checkpoint at
          or before the grok step (> 1: the gap closed before grokking);
        * ``qk_ratio_12_early`` (mean over checkpoints before the grok step;
          over all for a run that never groks), ``qk_ratio_12_grok`` and
          ``qk_ratio_12_end``: |lambda_1| / |lambda_2|.

        Per head, not pooled: heads of one layer need not agree, and a
        pooled figure would hide that. Options: ``wq``, ``heads``, ``device``.

        Examples
        --------
        >>> run.grokking(metric="test_acc").g23_decline                          # doctest: +SKIP
        >>> run.grokking(operator="qk", heads=4).qk_gap_23_decline               # doctest: +SKIP
        """
        if operator not in ("trajectory", "qk"):
            raise ValueError(f"unknown operator {operator!r}; use 'trajectory' or 'qk'")
        known = ("wq", "heads", "device") if operator == "qk" else ("params", "wq", "device")
        if unknown := sorted(set(options) - set(known)):  # before any spectra are built
            raise SelectionError(f"grokking (operator {operator!r}): unknown option {unknown[0]!r} (options: "
                                 f"{', '.join(known)})")
        if operator == "qk":
            return describe(compute_qk_grokking(self._store, self.metrics, metric=metric, threshold=threshold,
                                                **options))
        metrics = self.metrics
        grok_point(metrics, metric, threshold, self.path)  # a metric not logged, or a W_Q glob that matches
        find_wq(self._store, options.get("wq"))             # nothing, is refused before any band is built
        spectra = self.spectra(window=window, params=options.pop("params", None))
        return describe(compute_grokking(self._store, spectra, metrics, metric=metric, threshold=threshold,
                                         **options))

    @property
    def warnings(self) -> list[str]:
        return list(self._store.attrs.get("warnings", []))

    @property
    def provenance(self) -> dict:
        """Where the run came from: source, options and library versions, and its first and last checkpoint.

        Every checkpoint's files (with sizes and sha256) are in :attr:`sources`.
        """
        ends = self._store.sources_at(0, self.n_deltas) if self._store.commit_record else [None, None]
        return {**self._store.attrs.get("provenance", {}), "checkpoints": len(self.checkpoint_steps),
                "first": ends[0], "last": ends[-1]}

    @property
    def sources(self) -> list[dict]:
        """One entry per checkpoint, base first: its step, label and files (size, mtime, sha256)."""
        return self._store.sources

    def __repr__(self) -> str:
        steps = self.checkpoint_steps
        span = f"steps {steps[0]}..{steps[-1]}" if steps.size else "no checkpoints"
        return (
            f"<Run {self.path}: {self.n_deltas} deltas, {span}, "
            f"p={self.n_params:,}, {len(self._store.manifest)} tensors>"
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the run at a glance, the tensors and metrics folded."""
        from html import escape

        steps = self.checkpoint_steps
        metrics = self._store.attrs.get("metrics") or {}
        names = [n for n in dict(metrics.get("names", {})).values() if n != "step"]  # the index, not a series
        rows = [
            ("store", escape(self.path)),
            ("checkpoints", f"{steps.size}, steps {steps[0]}..{steps[-1]}" if steps.size else "none"),
            ("deltas", str(self.n_deltas)),
            ("parameters", f"{self.n_params:,} in {len(self._store.manifest)} tensors"),
            ("metrics", escape(", ".join(names)) or "none"),
            ("warnings", str(len(self.warnings)) if self.warnings else "none"),
        ]
        table = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{v}</td></tr>"
                        for k, v in rows)
        tensors = "".join(f"<tr><td style='text-align:left'>{escape(t.name)}</td><td>{'x'.join(map(str, t.shape))}"
                          f"</td><td>{escape(t.dtype)}</td></tr>" for t in self._store.manifest)
        return (f"<div><b>spectral_analyzer.Run</b><table>{table}</table>"
                f"<details><summary>tensors</summary><table>{tensors}</table></details></div>")


def open_run(
    store: str | os.PathLike = "spectral.zarr",
    *,
    storage_options: Mapping[str, Any] | None = None,
    client=None,
) -> Run:
    """Open an ingested run.

    Parameters
    ----------
    store : path or URL
        The store written by :func:`spectral_analyzer.ingest`: a folder or an
        fsspec URL (``s3://bucket/run.zarr``).
    storage_options : dict, optional
        Options of the fsspec filesystem of a URL (credentials, ``endpoint_url``).
    client : dask.distributed.Client or scheduler address, optional
        Where the band is built (default: local threads); a ``scheduler``
        option of a call overrides it.

    Returns
    -------
    Run

    Examples
    --------
    >>> run = sa.open_run("s3://bucket/run.zarr", client=Client("tcp://head:8786"))  # doctest: +SKIP
    """
    return Run(Store.open(store, storage_options=storage_options), client=client)


class _CheckedReads:
    """``deltas`` (committed rows) or ``base`` of a snapshot as an array for :func:`dask.array.from_array`:
    each block read through the snapshot's checked reads, so a chunk rewritten since it was opened (an
    overwrite, a recorder's resume) is an error naming it, never another commit's values."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.shape = (store.n_deltas, store.n_params) if name == "deltas" else (store.n_params,)
        self.dtype, self.ndim = np.dtype(np.float32), len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        spans = [k.indices(n)[:2] if isinstance(k, slice) else (int(k), int(k) + 1) for k, n in zip(key, self.shape)]
        (a, b) = spans[-1]
        if self.name == "base":
            return self.store.read_base(a, b) if b > a else np.zeros(0, dtype=np.float32)
        (r0, r1) = spans[0]
        out = np.zeros((max(r1 - r0, 0), max(b - a, 0)), dtype=np.float32)
        if out.size:
            for i, row in enumerate(range(r0, r1)):
                self.store.read_delta_row(row, a, b, out[i])
        return out if isinstance(key[0], slice) else out[0]


def _checked(store: Store, name: str) -> da.Array:
    """A lazy array of *name* in chunks of the store's, read and checked through *store* (see _CheckedReads)."""
    reads = _CheckedReads(store, name)
    chunks = ((1,) * store.n_deltas, store.chunk_size) if name == "deltas" else (store.chunk_size,)
    return da.from_array(reads, chunks=chunks, name=f"spectral-{name}-{store.identity}-{tokenize(store.path)[:12]}",
                         asarray=False, fancy=False, meta=np.zeros((0,) * reads.ndim, dtype=np.float32))

