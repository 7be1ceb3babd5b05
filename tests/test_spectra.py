from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import FIXTURES, LAYOUTS, write_run

import spectral_analyzer as sa
from spectral_analyzer.groups import SelectionError, layer_of, module_of
from spectral_analyzer.spectra import WindowError
from spectral_analyzer.spectra.kernel import bbp, wishart_max_ratio


def dense_sigma(x: np.ndarray, window: int, center: bool = False) -> np.ndarray:
    """Singular values of every window's explicit X, float64 SVD."""
    out = []
    for end in range(window - 1, x.shape[0]):
        xw = x[end - window + 1 : end + 1]
        if center:
            xw = xw - xw.mean(axis=0)
        out.append(np.linalg.svd(xw, compute_uv=False))
    return np.array(out)


def assert_sigma(ds, x, window, center=False):
    want = dense_sigma(x, window, center)
    got = ds["sigma"].values
    scale = want[:, :1]
    assert np.max(np.abs(got - want) / scale) < 1e-9


def stored_x(run) -> np.ndarray:
    return run.deltas.values.astype(np.float64)


@pytest.fixture(scope="module")
def grok_run(tmp_path_factory):
    return sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("g") / "g.zarr", chunk_size=3000)


@pytest.mark.parametrize("window", [2, 5, 10, 16])
def test_sigma_matches_svd_grokking(grok_run, window):
    ds = grok_run.spectra(window=window)
    assert_sigma(ds, stored_x(grok_run), window)
    assert list(ds["step"].values) == list(grok_run.steps[window - 1 :])


def test_sigma_matches_svd_every_fixture(tmp_path):
    for name in ["planted", "grokking/wd0"] + [f"layouts/{n}" for n in LAYOUTS]:
        run = sa.ingest(FIXTURES / name, tmp_path / f"{name.replace('/', '_')}.zarr", chunk_size=777)
        window = min(10, run.n_deltas)
        assert_sigma(run.spectra(window=window), stored_x(run), window)


def test_random_trajectory_odd_tensors(tmp_path):
    sizes = {"emb.w": (31, 17), "layers.0.attn.q.weight": (17, 17), "layers.0.mlp.fc1.weight": (41, 17),
             "layers.1.ln.weight": (17,), "head": (97,)}
    write_run(tmp_path / "src", 30, sizes, seed=9, scale=0.1)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=211)
    x = stored_x(run)
    for window in (3, 8, 12):
        assert_sigma(run.spectra(window=window, max_lag=12), x, window)
    assert_sigma(run.spectra(window=8, center=True), x, 8, center=True)


def test_subsets_and_groups_match_svd_of_their_columns(grok_run):
    x = stored_x(grok_run)
    t = grok_run.tensors
    names = list(t["tensor"].values)
    cols = {n: np.arange(int(o), int(o + s)) for n, o, s in zip(names, t["offset"].values, t["size"].values)}

    sub = grok_run.spectra(window=10, params="*attn*")
    picked = np.concatenate([cols[n] for n in names if "attn" in n])
    assert_sigma(sub, x[:, picked], 10)
    assert int(sub["n_params"]) == picked.size

    for group_by, key in (("layer", layer_of), ("module", module_of), ("tensor", lambda n: n)):
        ds = grok_run.spectra(window=10, group_by=group_by)
        for g in ds["group"].values:
            members = np.concatenate([cols[n] for n in names if key(n) == g])
            assert_sigma(ds.sel(group=g), x[:, members], 10)
    mods = grok_run.spectra(window=10, group_by="module")
    assert set(mods["group"].values) == {"embedding", "attention", "mlp", "norm"}  # unembed: embedding


@pytest.mark.parametrize("name, kind", [
    ("gpt_neox.embed_in.weight", "embedding"), ("embed_out.weight", "embedding"), ("lm_head.weight", "embedding"),
    ("transformer.wte.weight", "embedding"), ("gpt_neox.layers.0.attention.query_key_value.weight", "attention"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp"), ("gpt_neox.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.3.self_attn.o_proj.weight", "attention"), ("model.norm.weight", "norm"),
])
def test_module_kinds_of_common_names(name, kind):
    assert module_of(name) == kind


def test_planted_recovers_k_star_and_strengths(tmp_path):
    planted = json.loads((FIXTURES / "planted" / "planted.json").read_text())
    run = sa.ingest(FIXTURES / "planted", tmp_path / "p.zarr")
    ds = run.spectra(window=planted["window"])
    assert np.all(ds["k_star"].values == planted["planted_k_star"])
    top = ds["sigma"].values[:, :3]
    # noise of 1e-4 per entry over p = 24674 parameters moves sigma by ~1e-4 sqrt(p) / sigma ~ 1e-3 relative
    np.testing.assert_allclose(top, np.broadcast_to(planted["planted_sigma"], top.shape), rtol=2e-3)
    assert np.all(ds["gap_ratio"].values > 100)
    assert np.all(ds["p_value"].values == 1 / (1 + ds.attrs["null_draws"]))
    assert np.all(ds["margin"].values > 1)


def test_derived_quantities_against_direct_formulas(grok_run):
    window = 8
    ds = grok_run.spectra(window=window)
    p = grok_run.n_params
    sig = dense_sigma(stored_x(grok_run), window)
    lam = sig**2
    ratio = sig[:, :-1] / sig[:, 1:]
    k = np.argmax(ratio, axis=1) + 1
    assert np.array_equal(ds["k_star"].values, k)
    rows = np.arange(len(k))
    np.testing.assert_allclose(ds["gap_ratio"].values, ratio[rows, k - 1], rtol=1e-9)
    np.testing.assert_allclose(ds["gap"].values, sig[rows, k - 1] - sig[rows, k], rtol=1e-8)
    kw = np.argmax(sig[:, :-1] / sig.sum(axis=1, keepdims=True) * ratio, axis=1) + 1
    assert np.array_equal(ds["k_star_weighted"].values, kw)
    frac = np.cumsum(lam, axis=1) / lam.sum(axis=1, keepdims=True)
    assert np.array_equal(ds["k95"].values, np.argmax(frac >= 0.95, axis=1) + 1)
    nu = np.sqrt(lam[:, window // 2 :].mean(axis=1) / p)
    np.testing.assert_allclose(ds["nu"].values, nu, rtol=1e-9)
    np.testing.assert_allclose(ds["d_crit"].values, nu * (p * (window - 1)) ** 0.25, rtol=1e-9)
    np.testing.assert_allclose(ds["margin"].values, sig[:, -1] / (nu * (p * (window - 1)) ** 0.25), rtol=1e-8)
    assert np.isnan(ds["ratio"].values[:, -1]).all()


def test_bbp_when_centred_counts_the_window_s_degrees_of_freedom(grok_run):
    """Centred, lambda_W is 0 by construction: nu, d_crit and the margin are those of the W - 1 nonzero
    eigenvalues (isotropic noise then gives nu close to its true value, not biased low)."""
    window = 8
    ds = grok_run.spectra(window=window, center=True)
    p = grok_run.n_params
    lam = dense_sigma(stored_x(grok_run), window, center=True)[:, : window - 1] ** 2
    w = window - 1
    nu = np.sqrt(lam[:, w // 2 :].mean(axis=1) / p)
    np.testing.assert_allclose(ds["nu"].values, nu, rtol=1e-9)
    np.testing.assert_allclose(ds["margin"].values, np.sqrt(lam[:, -1]) / (nu * (p * (w - 1)) ** 0.25), rtol=1e-7)
    # isotropic noise with nu = 0.5: the estimate is near 0.5 centred as uncentred
    rng = np.random.default_rng(3)
    x = 0.5 * rng.standard_normal((10, 4000))
    x -= x.mean(axis=0)
    lam = np.linalg.eigvalsh(x @ x.T)[::-1][None]
    assert bbp(lam, 4000, center=True)["nu"][0] == pytest.approx(0.5, rel=0.06)


def test_margin_of_a_frozen_or_low_rank_group_is_undefined_not_infinite():
    lam = np.array([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [9.0, 4.0, 1.0, 1.0]])
    out = bbp(lam, 50)
    assert np.isnan(out["margin"][:2]).all() and np.isfinite(out["margin"][2])


def test_null_floor_is_infinite_where_the_window_is_wider_than_the_group(tmp_path):
    sizes = {"wide": (40,), "one": (3,)}
    write_run(tmp_path / "src", 12, sizes, seed=4, scale=0.1)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    ds = run.spectra(window=5, group_by="tensor")
    q95 = dict(zip(ds["group"].values.tolist(), np.atleast_1d(ds["null_q95"].values).tolist()))
    assert q95["one"] == np.inf and np.isfinite(q95["wide"])


@pytest.mark.parametrize("window, p", [(4, 30), (10, 200)])
def test_bartlett_null_matches_direct_simulation(window, p):
    bartlett = wishart_max_ratio(window, p, draws=6000, seed=1)
    rng = np.random.default_rng(2)
    direct = []
    for _ in range(6000):
        s = np.linalg.svd(rng.standard_normal((window, p)), compute_uv=False)
        direct.append(np.max(s[:-1] / s[1:]))
    for q in (0.5, 0.9, 0.95):
        assert np.quantile(bartlett, q) == pytest.approx(np.quantile(direct, q), rel=0.03)


def test_p_value_is_the_null_tail(grok_run):
    ds = grok_run.spectra(window=10)
    null = wishart_max_ratio(10, grok_run.n_params, draws=ds.attrs["null_draws"], seed=20240601)
    r = ds["gap_ratio"].values
    want = (1 + (null[None, :] >= r[:, None]).sum(axis=1)) / (1 + null.size)
    np.testing.assert_array_equal(ds["p_value"].values, want)
    assert float(ds["null_q95"]) == pytest.approx(np.quantile(null, 0.95))
    assert 1.0 < float(ds["null_q95"]) < 1.05  # p ~ 1.6e4: barely above 1


def test_window_edges(tmp_path):
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", tmp_path / "r.zarr")
    with pytest.raises(WindowError,
                       match=r"window 4 needs at least 4 deltas; the store has 3 \(between steps 0 and 30\)"):
        run.spectra(window=4)
    with pytest.raises(WindowError, match="at least 2"):
        run.spectra(window=1)
    assert run.spectra(window=3).sizes["step"] == 1
    with pytest.raises(SelectionError, match="no tensor matches 'nothing.*'"):
        run.spectra(window=2, params="nothing.*")


def test_frozen_tensors_give_inf_ratios_without_warnings(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(64, generator=gen)
    live = torch.randn(3, generator=gen)
    for i in range(8):
        live = live + torch.randn(3, generator=gen)  # p = 3 < W: rank-deficient windows
        save_file({"frozen": frozen, "live": live}, str(src / f"s_{i}.safetensors"))
    run = sa.ingest(src, tmp_path / "r.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = run.spectra(window=5)
        frozen_ds = run.spectra(window=5, params="frozen")
        grouped = run.spectra(window=5, group_by="tensor")
    assert np.all(np.isinf(ds["gap_ratio"].values)) and np.all(ds["k_star"].values == 3)
    assert np.all(ds["sigma"].values[:, 3:] == 0)
    assert np.all(frozen_ds["k_star"].values == 0) and np.all(np.isnan(frozen_ds["gap_ratio"].values))
    assert np.all(grouped.sel(group="frozen")["sigma"].values == 0)


def test_attrs_record_how_it_was_made(grok_run):
    ds = grok_run.spectra(window=6, params=["*mlp*", "embed.*"], stride=3)
    assert ds.attrs["window"] == 6 and ds.attrs["stride"] == 3 and ds.attrs["params"] == "*mlp*,embed.*"
    assert ds.attrs["precision"] == "float64" and ds.attrs["max_lag"] >= 6
    assert list(ds["step"].values) == list(grok_run.steps[5::3])


def test_grouped_result_round_trips_through_cache(grok_run):
    first = grok_run.spectra(window=10, group_by="layer")
    again = sa.open_run(grok_run.path).spectra(window=10, group_by="layer")
    assert list(again["group"].values) == list(first["group"].values)
    assert again.identical(first)
