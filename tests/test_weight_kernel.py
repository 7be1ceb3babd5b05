"""Singular values through the Gram, against numpy's float64 SVD, on planted spectra of any conditioning."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spectral_analyzer.weights.kernel import TOLERANCE, singular_values


def _planted(m: int, n: int, cond: float, rng, rank: int | None = None, basis=None) -> np.ndarray:
    """(u * s) @ v.T with singular values from 3.7 down to 3.7 / cond; *basis* (u, v) reused if given."""
    k = min(m, n)
    u, v = basis if basis is not None else _basis(m, n, rng)
    s = np.logspace(0, -np.log10(cond), k) * 3.7
    if rank is not None:
        s[rank:] = 0.0
    return (u * s) @ v.T


def _basis(m: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    k = min(m, n)
    return np.linalg.qr(rng.standard_normal((m, k)))[0], np.linalg.qr(rng.standard_normal((n, k)))[0]


@pytest.mark.parametrize("shape", [(64, 64), (30, 200), (96, 400), (400, 96), (500, 7), (97, 128),
                                   (300, 1100), (1100, 300), (520, 520)])  # the last three: Grams in blocks
def test_every_value_to_the_tolerance_and_the_leading_ones_to_their_own_precision(shape):
    rng = np.random.default_rng(sum(shape))
    basis = _basis(*shape, rng)  # one pair of singular bases: their QR is most of this test's time
    matrices = [_planted(*shape, cond, rng, basis=basis) for cond in (1, 10, 1e3, 1e5, 1e6, 1e8)]
    matrices.append(_planted(*shape, 10, rng, rank=min(shape) // 2, basis=basis))  # rank-deficient: an exact zero tail
    matrices.append(rng.standard_normal(shape).astype(np.float32))  # as weights are stored
    for w, got in zip(matrices, singular_values(matrices)):
        ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        assert got.shape == ref.shape
        np.testing.assert_array_less(np.abs(got - ref), TOLERANCE * ref[0])
        # the top 10 relative to themselves, where they are within 1e3 of sigma_1 (an SVD's own error
        # is eps sigma_1 in absolute terms, so no method does better for values far below sigma_1)
        lead = ref[:10] > 1e-3 * ref[0]
        np.testing.assert_array_less(np.abs(got[:10] - ref[:10])[lead], 1e-12 * ref[:10][lead])


@pytest.mark.parametrize("shape", [(1030, 1100), (1300, 1030), (255, 300), (300, 256)])
def test_the_gram_in_blocks_is_the_lower_triangle_of_the_product(shape):
    from spectral_analyzer.weights import kernel

    batch = torch.from_numpy(np.random.default_rng(3).standard_normal((2, *shape)))
    rows = batch if shape[0] <= shape[1] else batch.mT
    full = rows @ rows.mT
    got = kernel._lower_gram(batch)
    k = min(shape)
    assert kernel.gram_blocks(k) == min(8, k // 128) and kernel.gram_blocks(k, "meta") == 1
    lower = torch.tril(torch.ones(k, k, dtype=torch.bool))
    np.testing.assert_allclose(got[:, lower], full[:, lower], rtol=1e-13, atol=1e-12 * float(full.abs().max()))
    lam, want = torch.linalg.eigvalsh(got[0]), torch.linalg.eigvalsh(full[0])  # read the lower triangle
    np.testing.assert_allclose(lam, want, rtol=0, atol=1e-13 * float(want.abs().max()))


@pytest.mark.parametrize("shape", [(128, 128), (96, 400), (300, 700)])
def test_outliers_above_a_bulk_keep_the_bulk_s_leading_values_to_their_own_precision(shape):
    """Spikes 1e4x above a bulk: the Gram alone leaves the bulk's top values about 1e-9 off relative to
    themselves (measured); the refinement, taken only by such matrices, brings them to 1e-12."""
    from spectral_analyzer.weights import kernel

    rng = np.random.default_rng(7)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    s = np.linspace(1.0, 0.5, k)
    s[:2] = [1.5e4, 1.2e4]
    spiked = (u * s) @ v.T
    bulk = rng.standard_normal(shape)
    refined = []
    real = kernel.torch.linalg.eigh
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel.torch.linalg, "eigh", lambda g: refined.append(g.shape[0]) or real(g))
        got_spiked, got_bulk = singular_values([spiked, bulk])
    assert refined == [1]  # one of the two matrices needed the eigenvectors
    for w, got in ((spiked, got_spiked), (bulk, got_bulk)):
        ref = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_array_less(np.abs(got - ref), TOLERANCE * ref[0])
        np.testing.assert_array_less(np.abs(got[:10] - ref[:10]), 1e-12 * ref[:10])


@pytest.mark.parametrize("shape", [(179, 118), (118, 179), (300, 300)])
def test_a_collapsed_matrix_keeps_its_refined_leading_values_on_top(shape):
    """One value over a flat bulk 1.25e5 below it (a W_Q after grokking): the refined values were sorted
    together with the unrefined tail, whose rounding lifts it, so bulk values 2.3e-7 too large (relative
    to themselves: 8000 eps sigma_1) were reported as sigma_2 .. sigma_4. Values this far below sigma_1
    are known to a few eps sigma_1 by any SVD (numpy's included), not to 1e-12 of themselves."""
    rng = np.random.default_rng(5)
    u, v = _basis(*shape, rng)
    s = np.r_[1.0, np.full(min(shape) - 1, 8e-6)]
    w = (u * s) @ v.T
    (got,) = singular_values([w])
    ref = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_array_less(np.abs(got - ref), TOLERANCE * ref[0])
    bound = np.maximum(1e-12 * ref[:10], 8 * np.finfo(np.float64).eps * ref[0])
    np.testing.assert_array_less(np.abs(got[:10] - ref[:10]), bound)
    assert np.all(np.diff(got) <= 0)


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


def test_free_cores_are_the_cores_not_busy_now_measured_once_per_interval(monkeypatch):
    from spectral_analyzer import threads

    online = os.cpu_count() or 1
    samples = iter([(0, 0), (100, 100 * online), (0, 0), (0, 100 * online)])  # one core busy, then none
    calls = []
    monkeypatch.setattr(threads, "_cpu_times", lambda: calls.append(1) or next(samples))
    monkeypatch.setattr(threads, "_last", None)
    affinity = len(os.sched_getaffinity(0))
    assert threads.free_cores() == max(1, min(affinity, online - 1))
    assert threads.free_cores() == max(1, min(affinity, online - 1)) and len(calls) == 2  # reused, not resampled
    monkeypatch.setattr(threads, "_last", (threads.time.monotonic() - threads.REUSE_S, 1))
    assert threads.free_cores() == min(affinity, online) and len(calls) == 4


def test_free_cores_beside_cpu_bound_processes_is_one():
    """Every core kept busy by other processes: torch gets one thread (the load average, which lags,
    would still read an idle machine for the first seconds)."""
    import subprocess
    import sys
    import time

    from spectral_analyzer import threads

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        threads._last = None
        assert threads.free_cores() == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        threads._last = None


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


def test_a_batch_is_capped_by_its_memory_budget():
    from spectral_analyzer.weights.kernel import batch_limit

    assert batch_limit((768, 768), 1 << 30) == (1 << 30) // (8 * 5 * 768 * 768)
    assert batch_limit((30_522, 384), 1 << 20) == 1  # one matrix always goes, whatever its size
    assert batch_limit((400, 96), 8 * (2 * 400 * 96 + 3 * 96 * 96) * 7) == 7


def test_budgeted_batches_give_the_same_values(monkeypatch):
    """On a GPU a budget splits the matrices of a shape into batches of batch_limit; the values are the
    cpu path's (the device path run here on the cpu)."""
    import torch

    from spectral_analyzer.weights import kernel
    from spectral_analyzer.weights.kernel import batch_limit

    rng = np.random.default_rng(5)
    matrices = [rng.standard_normal((60, 20)) for _ in range(11)] + [rng.standard_normal((20, 20)) for _ in range(5)]
    want = singular_values(matrices)
    sizes = []
    real = kernel._gram_batch
    monkeypatch.setattr(kernel, "_gram_batch", lambda batch: sizes.append(batch.shape[0]) or real(batch))
    budget = 8 * (2 * 60 * 20 + 3 * 20 * 20) * 4
    got = kernel._batched_values(matrices, torch.device("cpu"), budget)
    assert batch_limit((60, 20), budget) == 4 and sizes == [4, 4, 3, 5]  # the square ones: one batch of 5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13 * w[0])


def test_the_cpu_path_takes_each_matrix_in_place_one_per_thread(monkeypatch):
    """No stacked copy on the cpu: each matrix's Gram from the caller's array (a transposed view too), the
    small ones in the threads of a pool with one torch thread each, a large one with all of them."""
    import threading

    import torch

    from spectral_analyzer.weights import kernel

    rng = np.random.default_rng(6)
    packed = rng.standard_normal((30, 90))
    small = [packed[:, :30].T, packed[:, 30:60].T, rng.standard_normal((40, 12))]
    large = rng.standard_normal((40, 30))
    monkeypatch.setattr(kernel, "SHARED_SIZE", 1000)
    seen = []
    real = kernel._gram_batch
    monkeypatch.setattr(kernel, "_gram_batch", lambda b: seen.append(
        (b.shape[1:], threading.current_thread().name, torch.get_num_threads())) or real(b))
    before = torch.get_num_threads()
    with kernel_threads(2):
        got = singular_values(small + [large])
        after = torch.get_num_threads()
    assert after == 2 and torch.get_num_threads() == before
    assert (torch.Size([40, 30]), threading.current_thread().name, 2) in seen  # the large one: all threads
    pooled = [s for s in seen if s[0] != torch.Size([40, 30])]
    assert len(pooled) == 3 and all(name.startswith("spectral-analyzer-svd") and n == 1 for _, name, n in pooled)
    for w, g in zip(small + [large], got):
        ref = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_array_less(np.abs(g - ref), TOLERANCE * ref[0])


def kernel_threads(n):
    from spectral_analyzer.threads import torch_threads

    return torch_threads(n)


def test_the_device_path_batches_checkpoints_together(tmp_path, monkeypatch):
    """On a GPU the matrices of many checkpoints go in one call (the held bytes); the values are those of the
    checkpoint-at-a-time path. Run on the cpu by giving it the device path's held bytes."""
    from conftest import write_run

    import spectral_analyzer as sa
    import spectral_analyzer.weights as weights

    write_run(tmp_path / "src", 12, {"a.weight": (24, 8), "b.weight": (8, 8), "c": (5,)}, seed=3)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")  # no weights recorded: reconstructed
    want = run.weight_spectra(device="cpu", cache=False)
    calls = []
    real = weights.singular_values
    monkeypatch.setattr(weights, "singular_values",
                        lambda mats, dev, top=None: calls.append(len(mats)) or real(mats, dev, top))
    monkeypatch.setattr(weights, "_held_bytes", lambda device: 5 * (24 * 8 + 8 * 8) * 8)
    got = run.weight_spectra(device="cpu", cache=False)
    assert calls == [10, 10, 4]  # 12 checkpoints x 2 matrices, five checkpoints a call
    np.testing.assert_array_equal(got.sigma.values, want.sigma.values)
    np.testing.assert_array_equal(got.stable_rank.values, want.stable_rank.values)


def test_thread_counts_set_by_blocks_in_several_threads_come_back_whatever_order_they_end_in():
    """A sets 1, B sets 2, A ends, B ends: the count is the one before A, not A's 1 (restoring what each block
    found would leave the process at 1 thread)."""
    import threading

    from spectral_analyzer.threads import torch_threads

    before = torch.get_num_threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with torch_threads(1):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with torch_threads(3):
            b_in.set()
            a_out.wait()
            seen["after A ended"] = torch.get_num_threads()  # B's block is still running
        seen["after both"] = torch.get_num_threads()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"after A ended": 3, "after both": before}
    with torch_threads(1):
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_block_ending_while_another_threads_block_runs_gives_its_thread_back_its_own_count():
    """The main thread's block ended while a worker's block (1 thread) ran: the main thread was left with the
    worker's count, not the one it had, and every later torch call in the notebook ran on one thread."""
    import threading

    from spectral_analyzer.threads import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        b_in, main_out = threading.Event(), threading.Event()

        def b():
            with torch_threads(1):
                b_in.set()
                main_out.wait()
                assert torch.get_num_threads() == 1

        worker = threading.Thread(target=b)
        with torch_threads(2):
            worker.start()
            b_in.wait()
        main_out.set()
        after = torch.get_num_threads()
        worker.join()
        assert after == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("scale", [1e-160, 1e-140, 1e140, 1e160])
def test_entries_near_the_limits_of_float64_keep_the_tolerance(scale):
    """Grams of entries of 1e-160 would underflow and of 1e+160 overflow: such matrices are scaled to entries of
    at most 1 first, by the batched (device) path too, and by the top-k iteration."""
    from spectral_analyzer.weights.kernel import TOP_TOLERANCE, _gram_batch, top_singular_values

    rng = np.random.default_rng(9)
    w = _planted(120, 300, 1e4, rng) * scale
    spiked = _spiked(2000, 300, [40, 25, 20, 12, 8], rng) * scale
    ref = np.linalg.svd(w, compute_uv=False)
    (got,) = singular_values([w])
    np.testing.assert_array_less(np.abs(got - ref), TOLERANCE * ref[0])
    batched, fallback = _gram_batch(torch.from_numpy(np.stack([w, w / scale])))
    assert not bool(fallback.any())
    np.testing.assert_array_less(np.abs(batched[0].numpy() - ref), TOLERANCE * ref[0])
    want = np.linalg.svd(spiked, compute_uv=False)[:4]
    top = top_singular_values(torch.from_numpy(spiked), 4)
    assert top is not None and np.max(np.abs(top.numpy() - want)) <= TOP_TOLERANCE * want[0]


def test_pool_threads_keep_one_thread_whatever_another_threads_block_restores():
    """The pool's initializer set 1 thread as its first torch call; torch fixes a thread's count at its first
    read, from the last count set anywhere: a block ending in another thread before then undid the 1."""
    import threading

    from spectral_analyzer.threads import one_thread_each, torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        started, go, seen = threading.Barrier(3), threading.Event(), []

        def fn(i):
            started.wait()  # both pool threads up, their initializer run, no torch call of fn's yet
            go.wait()
            seen.append(torch.get_num_threads())
            return i

        worker = threading.Thread(target=lambda: one_thread_each(fn, [0, 1]))
        with torch_threads(3):
            worker.start()
            started.wait()
        go.set()  # the main thread's block has ended, and set its own 2 again
        worker.join()
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(before)


def test_a_count_torch_refuses_leaves_nothing_to_restore():
    """set_num_threads(-3) raised after the block was recorded: the next block restored a stale count."""
    from spectral_analyzer import threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with threads.torch_threads(-3):
            pass
    assert threads._running == 0 and threads._local.counts == [] and torch.get_num_threads() == before


@pytest.mark.parametrize("shape", [(30, 30), (300, 300), (140, 37)])
def test_the_values_do_not_depend_on_where_the_matrix_lies(shape):
    """MKL rounds by its operands' alignment: the same matrix 8 bytes past a 16-byte boundary gave other last
    bits (25 of a 30 x 30 matrix's values), so a checkpoint's values moved with its buffer's address."""
    a = np.random.default_rng(5).standard_normal(shape)
    found = []
    for offset in range(8):  # the matrix at every 8-byte offset from a 64-byte boundary
        buf = np.empty(a.size + 8)
        m = buf[offset : offset + a.size].reshape(shape)
        m[...] = a
        found.append(singular_values([m])[0])
        found.append(singular_values([m], top=3)[0])
    for got in found[2::2]:
        np.testing.assert_array_equal(got, found[0])
    for got in found[3::2]:
        np.testing.assert_array_equal(got, found[1])
