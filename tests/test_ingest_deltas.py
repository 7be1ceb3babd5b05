"""The ingest's delta arithmetic: computed into the chunk buffers, bit for bit the plain formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest.pipeline import _delta, _delta_into, _may_overflow_float32

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _values(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Any finite values of *dtype* (subnormals, extremes, signed zeros) from random bit patterns."""
    if dtype in (torch.float16, torch.bfloat16):
        t = torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(dtype)
    elif dtype == torch.float32:
        t = torch.from_numpy(bits.astype(np.uint32).view(np.int32)).view(dtype)
    else:
        t = torch.from_numpy(bits.astype(np.uint64).view(np.int64)).view(dtype)
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=dtype))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_delta_into_is_the_formula_bit_for_bit(cur_dtype, prev_dtype, seed):
    rng = np.random.default_rng(seed)
    cur = _values(rng.integers(0, 2**63, 4099, dtype=np.uint64), cur_dtype)
    prev = _values(rng.integers(0, 2**63, 4099, dtype=np.uint64), prev_dtype)
    prev[:50] = cur[:50].to(prev_dtype)  # equal values: zero differences
    out = torch.empty(4099, dtype=torch.float32)
    with np.errstate(over="ignore"):
        _delta_into(out, cur, prev)
    np.testing.assert_array_equal(out.numpy().view(np.uint32), _delta(cur, prev).numpy().view(np.uint32))


def test_only_float16_differences_are_sure_to_fit_float32():
    big = torch.tensor([65504.0], dtype=torch.float16)
    assert torch.isfinite(_delta(big, -big)).all()  # the widest float16 difference
    assert not _may_overflow_float32(torch.float16, torch.float16)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert _may_overflow_float32(torch.float16, dtype)
        edge = torch.tensor([3.0e38], dtype=torch.float32).to(dtype)
        assert not torch.isfinite(_delta(edge, -edge)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_delta_that_overflows_float32_is_refused_by_name(tmp_path, dtype):
    src = tmp_path / "ckpts"
    src.mkdir()
    edge = torch.full((6,), 3.0e38).to(dtype)
    for step, w in ((0, -edge), (1, -edge), (2, edge)):
        save_file({"layer.w": w.clone(), "layer.b": torch.full((3,), float(step))}, str(src / f"step{step}.safetensors"))
    store = tmp_path / "run.zarr"
    with pytest.raises(sa.NonFiniteError) as caught:
        sa.ingest(src, store)
    message = str(caught.value)
    assert "'layer.w' at step 2" in message and "6 values" in message and "delta" in message
    assert "\n" not in message
    with pytest.raises(sa.StoreError, match="no store here"):  # a new store is made whole or not at all
        sa.open_run(store)


def test_float64_values_beyond_float32_are_refused_by_name(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    for step in (0, 1):
        save_file({"w": torch.tensor([1.0, 1e39 if step else 1.0], dtype=torch.float64)},
                  str(src / f"step{step}.safetensors"))
    with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*: 1 of its values overflow float32"):
        sa.ingest(src, tmp_path / "run.zarr")


def test_a_float64_delta_beyond_float32_is_refused_by_name(tmp_path):
    """Values float32 holds, a difference it does not: the delta is named."""
    src = tmp_path / "ckpts"
    src.mkdir()
    for step in (0, 1):
        save_file({"w": torch.tensor([1.0, 3e38 if step else -3e38], dtype=torch.float64)},
                  str(src / f"step{step}.safetensors"))
    with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*: 1 values of its delta from the previous"):
        sa.ingest(src, tmp_path / "run.zarr")


def test_an_overflow_is_counted_over_the_whole_tensor_across_chunks(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    edge = torch.full((10,), 3.0e38).to(torch.bfloat16)
    for step, w in ((0, -edge), (1, edge)):
        save_file({"w": w.clone()}, str(src / f"step{step}.safetensors"))
    with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*: 10 values of its delta"):
        sa.ingest(src, tmp_path / "run.zarr", chunk_size=4)


def test_a_resumed_recorder_whose_model_holds_inf_is_refused(tmp_path):
    """The previous values of a delta come from the recorder's snapshot at resume: checked like any checkpoint,
    so an infinity there is an error naming the step, not an infinite delta committed (float16: no overflow
    check of the delta would catch it)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4).half()
    store = tmp_path / "run.zarr"
    recorder = sa.Recorder(store, model)
    for step in (0, 1, 2):
        with torch.no_grad():
            model.weight.add_(1)
        recorder.record(step)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    resumed = sa.Recorder(store, model)
    with pytest.raises(sa.NonFiniteError, match=r"'weight' at step 1 .*1 NaN/Inf"):
        resumed.resume(1)  # refused before the rows after step 1 are dropped
    run = sa.open_run(store)
    assert run.checkpoint_steps.tolist() == [0, 1, 2]
    assert np.isfinite(run.deltas.values).all()
