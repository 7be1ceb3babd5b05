"""Cached results are keyed by RESULTS_REVISION: a change that alters a cached number must raise it, or
stores analysed by an earlier build keep serving that build's values. Three changes once did not (the
learning-rate series found by name, infinite R in the plateau, layer indices as written).

This test pins digests of the cached kinds of result on the shipped run (values to 5 significant digits,
names, dims and attributes) to the revision. When it fails after a change of definitions: raise
RESULTS_REVISION in spectral_analyzer/_version.py and record the new digests under the new revision."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
from conftest import FIXTURES

import spectral_analyzer as sa
from spectral_analyzer._version import RESULTS_REVISION

PINNED = {
    5: {"spectra": "daa6ed51f20cdd59", "layers": "ead97bd3eaadc39b", "dynamics": "b6b75a7c3e63adae",
        "weights": "7810a6d1e069765b"},
    6: {"spectra": "daa6ed51f20cdd59", "layers": "ead97bd3eaadc39b", "dynamics": "b6b75a7c3e63adae",
        "weights": "7810a6d1e069765b"},  # the shipped run's weights have full rank: no value changed
    7: {"spectra": "daa6ed51f20cdd59", "layers": "ead97bd3eaadc39b", "dynamics": "b6b75a7c3e63adae",
        "weights": "7810a6d1e069765b"},  # the shipped run has no ChatGLM layer and no collapsed matrix
}


def _digest(ds) -> str:
    h = hashlib.sha256()
    for name in sorted(map(str, ds.variables)):
        v = ds[name]
        h.update(json.dumps([name, list(v.dims), v.dtype.kind]).encode())
        values = v.values.ravel()
        if values.dtype.kind == "f":
            h.update(np.array2string(values, precision=5, floatmode="maxprec", threshold=10**9, separator=",").encode())
        else:
            h.update(json.dumps(values.tolist(), default=str).encode())
    h.update(json.dumps({k: str(ds.attrs[k]) for k in sorted(ds.attrs) if k != "spectral_analyzer_version"}).encode())
    return h.hexdigest()[:16]


def test_cached_results_are_those_of_their_revision(tmp_path):
    run = sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path / "r.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {"spectra": _digest(run.spectra(window=10, cache=False)),
               "layers": _digest(run.spectra(window=10, group_by="layer", cache=False)),
               "dynamics": _digest(run.dynamics(window=10, cache=False)),
               "weights": _digest(run.weight_spectra(cache=False))}
    if RESULTS_REVISION not in PINNED:
        pytest.fail(f"no digests pinned for RESULTS_REVISION {RESULTS_REVISION}: record {got}")
    assert got == PINNED[RESULTS_REVISION], (
        f"cached results differ from those of RESULTS_REVISION {RESULTS_REVISION}: raise it, and pin {got}")
