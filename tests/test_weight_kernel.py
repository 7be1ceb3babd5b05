"""Singular values through the Gram, against numpy's float64 SVD, on planted spectra of any conditioning."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spectral_analyzer.weights.kernel import TOLERANCE, singular_values


def _planted(m: int, n: int, cond: float, rng, rank: int | None = None) -> np.ndarray:
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.logspace(0, -np.log10(cond), k) * 3.7
    if rank is not None:
        s[rank:] = 0.0
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(64, 64), (30, 200), (96, 400), (400, 96), (500, 7), (97, 128)])
def test_every_value_to_the_tolerance_and_the_leading_ones_to_their_own_precision(shape):
    rng = np.random.default_rng(sum(shape))
    matrices = [_planted(*shape, cond, rng) for cond in (1, 10, 1e3, 1e5, 1e6, 1e8)]
    matrices.append(_planted(*shape, 10, rng, rank=min(shape) // 2))  # rank-deficient: an exact zero tail
    matrices.append(rng.standard_normal(shape).astype(np.float32))  # as weights are stored
    for w, got in zip(matrices, singular_values(matrices)):
        ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        assert got.shape == ref.shape
        np.testing.assert_array_less(np.abs(got - ref), TOLERANCE * ref[0])
        # the top 10 relative to themselves, where they are within 1e3 of sigma_1 (an SVD's own error
        # is eps sigma_1 in absolute terms, so no method does better for values far below sigma_1)
        lead = ref[:10] > 1e-3 * ref[0]
        np.testing.assert_array_less(np.abs(got[:10] - ref[:10])[lead], 1e-12 * ref[:10][lead])


def test_matrices_of_one_shape_are_batched_and_of_others_kept_apart():
    rng = np.random.default_rng(3)
    matrices = [rng.standard_normal((40, 9)), rng.standard_normal((9, 40)), rng.standard_normal((40, 9)),
                np.zeros((5, 0))]
    got = singular_values(matrices)
    for w, s in zip(matrices, got):
        np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False), rtol=0, atol=1e-12 * max(1, s[:1].sum()))


def test_torch_threads_are_set_for_the_block_and_restored():
    import torch

    from spectral_analyzer.threads import free_cores, torch_threads

    before = torch.get_num_threads()
    assert 1 <= free_cores() <= (os.cpu_count() or 1)
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _spiked(m: int, n: int, spikes, rng) -> np.ndarray:
    """Planted leading values over a Marchenko-Pastur bulk of edge about 1 + sqrt(n / m)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, len(spikes))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(spikes))))
    return (u * np.asarray(spikes)) @ v.T + rng.standard_normal((m, n)) / np.sqrt(m)


@pytest.mark.parametrize("shape", [(2000, 300), (300, 2000)])
def test_top_k_by_subspace_iteration_to_its_stated_tolerance(shape):
    import torch

    from spectral_analyzer.weights.kernel import TOP_TOLERANCE, top_singular_values

    rng = np.random.default_rng(shape[0])
    w = _spiked(*shape, [40, 25, 20, 12, 8], rng)
    want = np.linalg.svd(w, compute_uv=False)
    got = top_singular_values(torch.from_numpy(w), 4)
    assert got is not None  # a clear gap after the 4th value: converges within the dense path's cost
    assert np.max(np.abs(got.numpy() - want[:4])) <= TOP_TOLERANCE * want[0]
    # no gap (a pure bulk): it gives up and the dense path answers, to the dense path's tolerance
    bulk = rng.standard_normal(shape)
    assert top_singular_values(torch.from_numpy(bulk), 4) is None
    (values,) = singular_values([bulk], top=4)
    np.testing.assert_allclose(values, np.linalg.svd(bulk, compute_uv=False)[:4], rtol=0, atol=TOLERANCE * values[0])
    (values,) = singular_values([w], top=4)
    assert values.shape == (4,) and np.max(np.abs(values - want[:4])) <= TOP_TOLERANCE * want[0]
