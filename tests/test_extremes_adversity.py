"""Numbers at the edges of float32 and float64: changes below float32's range, metrics of extreme scale,
exactly rank-deficient and empty weight matrices, a grokking summary whose g23 is 0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.store import Store
from spectral_analyzer.weights.kernel import matrix_stats, singular_values


def test_float64_changes_below_float32s_range_are_told(tmp_path):
    """A float64 tensor moving by 1e-50 a step was stored as zero deltas in silence (its spectra read as a
    frozen tensor), and a whole model so small was told as identical checkpoints."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    big, tiny = np.zeros(8), np.zeros(8)
    for i in range(4):
        if i:
            big, tiny = big + rng.standard_normal(8), tiny + 1e-50 * rng.standard_normal(8)
        save_file({"big": torch.tensor(big), "tiny": torch.tensor(tiny)}, str(src / f"step_{10 * i}.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sa.ingest(src, tmp_path / "r.zarr", progress=False)
    told = [str(w.message) for w in caught if issubclass(w.category, sa.UnderflowWarning)]
    assert len(told) == 1 and told[0].startswith("tensor 'tiny' at step 10") and "8 of its float64 changes" in told[0]
    assert Store.open(str(tmp_path / "r.zarr")).attrs["warnings"] == told
    assert not [w for w in caught if issubclass(w.category, sa.DuplicateCheckpointWarning)]


def test_float32_subnormal_changes_are_exact_and_quiet(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        save_file({"w": torch.full((4,), 1e-40 * (i + 1), dtype=torch.float32)}, str(src / f"step_{i}.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnderflowWarning)
        run = sa.ingest(src, tmp_path / "r.zarr", progress=False)
    assert (run.deltas.values != 0).all()


@pytest.mark.parametrize("scale", [1e155, 1e-200])
def test_a_lagged_correlation_does_not_depend_on_the_metrics_scale(tmp_path, scale):
    """r at 1e155 came out 0 at every lag (its products overflowed), at 1e-200 NaN (they underflowed)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    theta = np.zeros(30)
    for i in range(21):
        if i:
            theta = theta + rng.standard_normal(30) * (1 + 0.5 * np.sin(i))
        save_file({"w": torch.tensor(theta, dtype=torch.float32)}, str(src / f"step_{10 * i}.safetensors"))
    loss = 5 + rng.standard_normal(21)
    found = []
    for s in (1.0, scale):
        (src / "metrics.csv").write_text("step,loss\n" + "".join(f"{10 * i},{float(loss[i] * s)!r}\n" for i in range(21)))
        run = sa.ingest(src, tmp_path / f"r{s}.zarr", metrics=src / "metrics.csv", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            found.append(run.correlate("loss", window=3)["r"].values)
    np.testing.assert_allclose(found[1], found[0], rtol=1e-12, atol=1e-15)
    assert np.isfinite(found[0]).any()


def test_an_exactly_rank_deficient_matrix_has_zeros_below_its_rounding():
    """sigma_1 / sigma_2 of rank-1 matrices was 1e16 (rounding) at one step and inf at the next."""
    rank1 = np.outer(np.arange(1.0, 7.0), np.arange(1.0, 5.0))
    for m in (rank1, np.full((3, 3), 1e38) * (1 + 1e-7), np.full((6, 4), 0.3)):
        values = singular_values([m])[0]
        np.testing.assert_allclose(values[0], np.linalg.svd(m, compute_uv=False)[0], rtol=1e-14)
        assert (values[1:] == 0).all()
        assert matrix_stats(values[None])["sigma_ratio_12"][0] == np.inf
    full = np.random.default_rng(1).standard_normal((6, 4))
    np.testing.assert_allclose(singular_values([full])[0], np.linalg.svd(full, compute_uv=False), rtol=1e-13)


def test_weights_with_no_values_give_nan_statistics(tmp_path):
    """weight_spectra of a (0, 4) placeholder alone raised an IndexError (traceback from the CLI)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        save_file({"a.weight": torch.randn(5, 3), "e.weight": torch.zeros(0, 4)}, str(src / f"s_{i}.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.UnreadWeightsWarning)
        run = sa.ingest(src, tmp_path / "r.zarr", progress=False)
    ws = run.weight_spectra("e.weight", cache=False)
    assert ws.sizes["rank"] == 0 and np.isnan(ws["sigma_ratio_12"].values).all()


def test_a_grokking_summary_with_g23_of_zero_at_grokking_is_quiet(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    d = rng.standard_normal((12, 2))
    d[6:, 1] = 0  # windows of rank 1 from delta 6 on: lambda_2 = lambda_3 = 0
    theta = np.vstack([np.zeros((1, 2)), np.cumsum(d, 0)]).astype(np.float32)
    for i, t in enumerate(theta):
        save_file({"w": torch.tensor(t)}, str(src / f"step_{10 * i}.safetensors"))
    (src / "metrics.csv").write_text("step,test_acc\n" + "".join(f"{10 * i},{0.1 if i < 11 else 0.99}\n" for i in range(13)))
    run = sa.ingest(src, tmp_path / "r.zarr", metrics=src / "metrics.csv", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert float(run.grokking(window=3)["g23_decline"]) == np.inf


def test_a_float64_recorder_tells_an_underflow_once():
    """Told at every recorded step (and kept as many times in the store's warnings)."""
    import tempfile
    from pathlib import Path

    model = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        model.bias.zero_()
    with tempfile.TemporaryDirectory() as tmp:
        recorder = sa.Recorder(Path(tmp) / "r.zarr", model)
        caught = []
        for step in range(5):
            with torch.no_grad():
                model.bias.add_(1e-50)
            with warnings.catch_warnings(record=True) as told:
                warnings.simplefilter("always")
                recorder.step(step)
            caught += [w for w in told if issubclass(w.category, sa.UnderflowWarning)]
        assert len(caught) == 1
        assert len([m for m in Store.open(str(Path(tmp) / "r.zarr")).attrs["warnings"] if "float32's range" in m]) == 1


def test_an_exactly_rank_deficient_attention_circuit_has_zeros_below_its_rounding():
    """qk_sigma_1 / qk_sigma_2 and |lambda_1| / |lambda_2| of a rank-1 head were 1e16 and 4e15 by step."""
    from spectral_analyzer.weights.attention import circuit_spectra

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(4, 16, dtype=torch.float64, generator=g) for _ in range(2))
    o = torch.randn(16, 4, dtype=torch.float64, generator=g)
    u, w = torch.randn(4, 1, dtype=torch.float64, generator=g), torch.randn(1, 16, dtype=torch.float64, generator=g)
    for step in range(4):
        c = circuit_spectra(u @ (w + 0.1 * step), k, v, o, heads=1, kv_heads=1)
        assert (c["qk_sigma"][0, 1:] == 0).all() and (c["qk_eig"][0, 1:] == 0).all()
        assert (c["ov_sigma"][0] > 0).all()
    full = circuit_spectra(torch.randn(4, 16, dtype=torch.float64, generator=g), k, v, o, heads=1, kv_heads=1)
    assert (full["qk_sigma"] > 0).all() and (full["qk_eig"].abs() > 0).all()
