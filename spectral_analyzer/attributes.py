"""CF-style attributes of every result: ``long_name``, ``units`` and a ``description`` per variable and coordinate.

xarray's own plots label their axes with ``long_name [units]``, so
``ds.gap_ratio.plot()`` reads "gap ratio R = sigma_k* / sigma_k*+1 [1]".
Units: ``1`` for ratios, probabilities and indices; ``step`` for training
steps; ``theta`` for values in the parameters' own units (``theta^2`` for
their squares); names and labels have none.
"""

from __future__ import annotations

import xarray as xr

__all__ = ["describe", "windowed"]

_ATTRS: dict[str, tuple[str, str | None, str]] = {
    # name: (long_name, units, description)
    # coordinates
    "step": ("training step", "step", "end step of the window's last delta (of the delta, checkpoint or log row)"),
    "window_start": ("first step of the window", "step", "step of the checkpoint the window's first delta starts at"),
    "mode": ("mode j", "1", "index of the singular value, 1 the largest"),
    "mode_prev": ("mode of the previous window", "1", "index j of the previous window's mode"),
    "k": ("subspace dimension k", "1", "dimension of the top-k subspaces compared"),
    "group": ("parameter group", None, "the tensors of one layer, module or tensor (group_by)"),
    "matrix": ("weight matrix", None, "name of the weight matrix (split packed q/k/v, heads)"),
    "layer": ("attention layer", None, "module prefix shared by the layer's q, k, v and output projections"),
    "head": ("attention head h", "1", "index of the query head in its layer, from 0"),
    "rank": ("singular value index", "1", "1 the largest"),
    "tensor": ("tensor", None, "name of the tensor in the checkpoints"),
    "lag": ("lag l", "1", "distance along the steps: in deltas for the band, in windows for correlations"),
    "event": ("event", "1", "index of the event, in step order"),
    "run": ("run", None, "the store the values come from"),
    "store": ("store", None, "path or URL of the store"),
    # spectra
    "sigma": ("singular value sigma_j", "theta", "singular values sigma_j = sqrt(lambda_j) of the window's delta "
              "matrix (weights: of the weight matrix)"),
    "lambda": ("Gram eigenvalue lambda_j", "theta^2", "eigenvalues of the window Gram G = X X^T, descending"),
    "ratio": ("singular value ratio sigma_j / sigma_j+1", "1", "sigma_j / sigma_{j+1} (NaN for the last mode)"),
    "k_star": ("spectral gap position k*", "1", "argmax_j ratio_j, 1-based (0: undefined)"),
    "gap_ratio": ("gap ratio R = sigma_k* / sigma_k*+1", "1", "R = ratio at k*"),
    "max_ratio": ("largest ratio max_j sigma_j / sigma_j+1", "1", "max_j ratio_j (= gap_ratio)"),
    "gap": ("spectral gap sigma_k* - sigma_k*+1", "theta", "sigma_{k*} - sigma_{k*+1}"),
    "k95": ("modes holding 95% of the energy", "1", "smallest k with 95% of sum(lambda) in the top k"),
    "k_star_weighted": ("weighted gap position", "1", "argmax_j (sigma_j / sum sigma) ratio_j"),
    "p_value": ("p-value of R under isotropic noise", "1", "P(max ratio of Wishart_W(p, I) noise >= R)"),
    "null_q95": ("noise floor of R (95% quantile)", "1",
                 "95% quantile of the max ratio under isotropic noise (floor of significance)"),
    "nu": ("BBP noise level nu", "theta", "sqrt(mean(lambda_j, j > W/2) / p)"),
    "d_crit": ("BBP detection threshold", "theta", "nu (p (W-1))^(1/4)"),
    "margin": ("BBP margin sigma_W / d_crit", "1", "sigma_W / d_crit"),
    "n_params": ("parameters", "1", "parameters in the subset or group"),
    # dynamics
    "alpha": ("Davis-Kahan stability alpha_j", "1", "clip(1 - C ||dC||_F / dlambda_j, 0, 1)"),
    "alpha_halves": ("stability between the window's halves", "1", "|<v_j^(1), v_j^(2)>|"),
    "overlap": ("mode overlap <v_j(i-1), v_k(i)>", "1", "overlap of the previous window's modes with this one's"),
    "rotation": ("mode rotation arccos |O_jj|", "rad", "angle between mode j of consecutive windows"),
    "tracked_from": ("mode continued", "1", "previous mode each mode continues (best overlap)"),
    "rotation_tracked": ("rotation of the tracked mode", "rad", "arccos of the overlap with the mode it continues"),
    "principal_angle": ("largest principal angle of the top-k subspaces", "rad",
                        "between the top-k subspaces of consecutive windows, for k = 1 .. top_k"),
    "dC_norm": ("update norm ||dC||_F", "theta^2", "Frobenius norm of d_i d_i^T - d_{i-W} d_{i-W}^T"),
    "lambda_change": ("observed eigenvalue change", "theta^2", "lambda_j(i) - lambda_j(i-1)"),
    "flow_entering": ("flow from the entering delta", "theta^2", "<v_j, d_i>^2"),
    "flow_exiting": ("flow to the exiting delta", "theta^2", "<v_j, d_{i-W}>^2"),
    "flow_first": ("first-order flow (Hellmann-Feynman)", "theta^2", "flow_entering - flow_exiting"),
    "flow_repulsion": ("second-order flow: level repulsion", "theta^2", "from the other modes of the window"),
    "flow_outside": ("second-order flow: the rest of R^p", "theta^2", "from outside the window's span"),
    "flow_second": ("second-order flow", "theta^2", "flow_repulsion + flow_outside"),
    "flow_residual": ("flow residual", "theta^2", "lambda_change - flow_first - flow_second"),
    "gap_change": ("change of the gap", "theta", "gap(i) - gap(i-1)"),
    "lr": ("learning rate eta", None, "from the metrics, or given"),
    "adiabatic": ("adiabatic parameter A", "1", "||dC||_F / (eta g^2)"),
    "energy": ("mode energy share", "1", "share of mode j carried by each group"),
    "phase": ("phase of R(t)", None, "rise, plateau or collapse"),
    "event_step": ("event step", "step", "step at which the event holds"),
    "event_kind": ("event kind", None, "what happened (collapse, opening, k* shift, ...)"),
    "event_mode": ("event mode", "1", "k* at the event"),
    "event_value": ("event value", "1", "R at the event"),
    # weights and grokking
    "sigma_ratio_12": ("sigma_1 / sigma_2 of the weight", "1", "sigma_1 / sigma_2"),
    "g12": ("gap sigma_1 - sigma_2 of the weight", "theta", "sigma_1 - sigma_2"),
    "g23": ("gap sigma_2 - sigma_3 of the weight", "theta", "sigma_2 - sigma_3"),
    "stable_rank": ("stable rank", "1", "||W||_F^2 / sigma_1^2"),
    "spectral_norm": ("spectral norm lambda_max", "theta^2", "sigma_1^2, the largest eigenvalue of the ESD"),
    "pl_alpha": ("power-law exponent alpha of the ESD tail", "1",
              "MLE 1 + n / sum log(lambda / xmin) over the tail, xmin by the KS distance (as WeightWatcher)"),
    "xmin": ("start of the power-law tail", "theta^2", "the eigenvalue where the fitted tail starts"),
    "ks_distance": ("KS distance of the power-law fit", "1", "max |empirical - fitted CDF| over the tail"),
    "n_tail": ("eigenvalues in the power-law tail", "1", "eigenvalues >= xmin"),
    "mp_edge": ("Marchenko-Pastur bulk edge", "theta^2",
                "v (sqrt N + sqrt M)^2, v from the median eigenvalue"),
    "n_outliers": ("eigenvalues beyond the bulk edge", "1",
                   "eigenvalues above mp_edge by more than the Tracy-Widom 99% margin"),
    "grokked": ("grokked", None, "whether the metric reached the threshold"),
    "grok_step": ("grok step", "step", "first logged step where the metric reaches the threshold (NaN: never)"),
    "g23_decline": ("decline of the trajectory gap g23", "1", "g23 at its pre-grok peak / g23 at grokking"),
    "g23_peak_step": ("step of the g23 peak", "step", "end step of the window where g23 peaks before grokking"),
    "R_early": ("mean R before grokking", "1", "mean gap ratio over windows ending before the grok step"),
    "R_grok": ("R at grokking", "1", "gap ratio of the last window ending at or before the grok step"),
    "k_star_mode": ("most frequent k*", "1", "the mode of k* over the windows"),
    "wq_sigma_ratio_grok": ("W_Q sigma_1 / sigma_2 at grokking", "1", "of the query weight at the last checkpoint at or before the grok step"),
    "wq_sigma_ratio_end": ("W_Q sigma_1 / sigma_2 at the end", "1", "of the query weight at the last checkpoint"),
    # attention circuits
    "qk_sigma": ("QK circuit singular value", "theta^2", "singular values of W_QK^h = W_Q^h^T W_K^h, descending"),
    "qk_eig_abs": ("QK circuit eigenvalue modulus |lambda_j|", "theta^2",
                   "moduli of the nonzero eigenvalues of W_QK^h (those of W_K^h W_Q^h^T), descending"),
    "qk_eig_phase": ("QK circuit eigenvalue phase arg lambda_j", "rad",
                     "lambda_j = qk_eig_abs * exp(i qk_eig_phase); 0 or pi for a real eigenvalue"),
    "ov_sigma": ("OV circuit singular value", "theta^2", "singular values of W_OV^h = W_O^h W_V^h, descending"),
    "qk_ratio_12": ("QK eigenvalue ratio |lambda_1| / |lambda_2|", "1", "|lambda_1| / |lambda_2| of W_QK^h"),
    "qk_gap_23": ("QK sub-leading gap |lambda_2| - |lambda_3|", "theta^2", "|lambda_2| - |lambda_3| of W_QK^h"),
    "layout": ("attention layout", None, "how q, k, v are stored (mha_packed, conv1d_packed, linear_packed, "
               "neox_packed, separate)"),
    "query": ("query matrix", None, "the layer's W_Q, named as weight_spectra names it"),
    "n_heads": ("query heads", "1", "heads of the layer"),
    "n_kv_heads": ("key/value heads", "1", "key/value heads (fewer than the query heads: grouped-query attention)"),
    "d_head": ("head dimension d_head", "1", "rows of W_Q per head"),
    "qk_gap_23_decline": ("decline of the QK sub-leading gap", "1",
                          "|lambda_2| - |lambda_3| at its pre-grok peak / at grokking"),
    "qk_gap_23_peak_step": ("step of the QK sub-leading gap's peak", "step",
                            "checkpoint where |lambda_2| - |lambda_3| peaks, at or before the grok step"),
    "qk_ratio_12_early": ("mean QK |lambda_1| / |lambda_2| before grokking", "1",
                          "mean over checkpoints before the grok step (all, for a run that never groks)"),
    "qk_ratio_12_grok": ("QK |lambda_1| / |lambda_2| at grokking", "1",
                         "at the last checkpoint at or before the grok step"),
    "qk_ratio_12_end": ("QK |lambda_1| / |lambda_2| at the end", "1", "at the last checkpoint"),
    # correlation
    "series": ("spectral series", None, "gap_ratio or ratio_j, correlated with the metric"),
    "r": ("lagged correlation r(l)", "1", "corr(x_t, y_{t+l}) of the detrended series"),
    "best_lag": ("lag of the strongest correlation", "1", "in windows (> 0: the spectrum leads)"),
    "best_r": ("strongest correlation", "1", "r at best_lag"),
    "k_star_cross": ("k* crossing", "1", "the mode whose ratio correlates most strongly"),
    "lag_steps": ("training steps at lag l", "step", "median step offset between windows l apart"),
    # run tables
    "band": ("band entry <d_i, d_i-l>", "theta^2", "inner product of deltas i and i - l within the tensor"),
    "offset": ("offset", "1", "first parameter of the tensor in the flattened parameter vector"),
    "size": ("size", "1", "number of parameters"),
    "shape": ("shape", None, "the tensor's shape, a tuple of ints"),
    "ndim": ("dimensions", "1", "number of dimensions of the tensor"),
    "dtype": ("source dtype", None, "dtype in the first checkpoint (a later change is told as it is ingested)"),
}


def describe(ds: xr.Dataset) -> xr.Dataset:
    """Set ``long_name``, ``units`` and ``description`` on every variable and coordinate *ds* has (in place).

    A name without an entry (a logged metric, say) gets its own name as
    ``long_name``. Returns *ds*.
    """
    for name in [*ds.data_vars, *ds.coords]:
        long_name, units, text = _ATTRS.get(str(name), (str(name).replace("_", " "), None, ""))
        attrs = ds[name].attrs
        attrs.setdefault("long_name", long_name)
        if units is not None:
            attrs.setdefault("units", units)
        if text:
            attrs.setdefault("description", text)
    return ds


def windowed(ds: xr.Dataset, steps, checkpoint_steps, window: int) -> xr.Dataset:
    """*ds* (one value per window, along ``step``) described, with the ``window_start`` coordinate.

    ``window_start`` is the step of the checkpoint a window's first delta
    starts at; *steps* are the deltas' end steps.
    """
    import numpy as np

    ends = np.searchsorted(steps, ds["step"].values)
    return describe(ds.assign_coords(window_start=("step", np.asarray(checkpoint_steps)[ends - window + 1])))

