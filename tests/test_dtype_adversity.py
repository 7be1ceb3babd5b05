"""Precisions across a run's boundaries: an append whose previous files are gone, a recorder started anew,
remote pickles read late, weights of no float dtype, and a float64 run's rounded base."""

from __future__ import annotations

import warnings

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.errors import PrecisionChangeWarning, UnreadWeightsWarning
from spectral_analyzer.store import Store


def _weights(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    out = []
    for _ in range(n):
        w = w + 1e-4 * rng.standard_normal((16, 16)).astype(np.float32)
        out.append(w.copy())
    return out


def _told(fn, *args, **kwargs) -> tuple[object, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, caught


def test_an_append_whose_previous_files_are_gone_tells_a_change_of_precision(tmp_path):
    """A float32 run's files rotated away (save_total_limit), then a bfloat16 checkpoint appended: its delta,
    17x the others, was taken in silence (the change was only seen between files at hand)."""
    src = tmp_path / "src"
    src.mkdir()
    ws = _weights(4)
    for k in range(3):
        save_file({"l.weight": torch.from_numpy(ws[k])}, str(src / f"step_{10 * k}.safetensors"))
    sa.ingest(src, tmp_path / "r.zarr", progress=False)
    for k in range(3):
        (src / f"step_{10 * k}.safetensors").unlink()
    save_file({"l.weight": torch.from_numpy(ws[3]).to(torch.bfloat16)}, str(src / "step_30.safetensors"))
    _, caught = _told(sa.ingest, src, tmp_path / "r.zarr", progress=False)
    told = [str(w.message) for w in caught if issubclass(w.category, PrecisionChangeWarning)]
    assert len(told) == 1 and "'l.weight' is float32 at step 20" in told[0] and "bfloat16 at step 30" in told[0]
    assert told == Store.open(str(tmp_path / "r.zarr")).attrs["warnings"]


def test_a_recorder_started_anew_tells_a_change_of_precision_from_the_store(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    recorder = sa.Recorder(tmp_path / "r.zarr", model)
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1e-3)
        recorder.step(step)
    model.to(torch.bfloat16)  # the training resumed in bfloat16, a new recorder on the same store
    _, caught = _told(sa.Recorder(tmp_path / "r.zarr", model).step, 3)
    told = [str(w.message) for w in caught if issubclass(w.category, PrecisionChangeWarning)]
    assert len(told) == 1 and "is float32 at step 2" in told[0] and "bfloat16 at step 3" in told[0]
    assert Store.open(str(tmp_path / "r.zarr")).attrs["warnings"] == told


def test_remote_pickles_read_late_tell_a_change_of_precision(tmp_path):
    """Remote pickles after the first are only read when their rows are written; a change of precision
    among them was never compared."""
    fs = fsspec.filesystem("memory")
    for k, w in enumerate(_weights(4, seed=6)):
        t = torch.from_numpy(w)
        torch.save({"l.weight": t if k < 2 else t.to(torch.bfloat16)}, tmp_path / "x.pt")
        fs.pipe(f"/dtypes-late/step_{10 * k}.pt", (tmp_path / "x.pt").read_bytes())
    try:
        _, caught = _told(sa.ingest, "memory:///dtypes-late", tmp_path / "r.zarr", progress=False)
    finally:
        fs.rm("/dtypes-late", recursive=True)
    told = [str(w.message) for w in caught if issubclass(w.category, PrecisionChangeWarning)]
    assert len(told) == 1 and "float32 at step 10" in told[0] and "bfloat16 at step 20" in told[0]
    assert Store.open(str(tmp_path / "r.zarr")).attrs["warnings"] == told


def _quantised_model() -> torch.nn.Module:
    """A linear layer beside an int8 weight (a quantised module's buffer)."""
    model = torch.nn.Module()
    model.l = torch.nn.Linear(4, 4)
    model.q = torch.nn.Module()
    model.q.register_buffer("weight", torch.ones(4, 4, dtype=torch.int8))
    return model


def test_a_recorder_tells_and_records_weights_of_no_float_dtype(tmp_path):
    model = _quantised_model()
    recorder = sa.Recorder(tmp_path / "r.zarr", model)
    caught = []
    for step in range(3):
        with torch.no_grad():
            model.l.weight.add_(0.1)
        caught += _told(recorder.step, step)[1]
    told = [str(w.message) for w in caught if issubclass(w.category, UnreadWeightsWarning)]
    assert len(told) == 1 and "'q.weight' (int8) is not read" in told[0]
    store = Store.open(str(tmp_path / "r.zarr"))
    assert [t.name for t in store.manifest] == ["l.bias", "l.weight"]
    assert all(s.get("unread") == {"q.weight": "int8"} for s in store.sources[1:])


@pytest.mark.parametrize("later", [torch.int8, torch.complex64])
def test_a_weight_of_another_kind_in_a_later_checkpoint_is_named_so(tmp_path, later):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"q.weight": torch.ones(4, 4)}, str(src / "step_0.safetensors"))
    save_file({"q.weight": torch.ones(4, 4).to(later)}, str(src / "step_1.safetensors"))
    kind = str(later).removeprefix("torch.")
    with pytest.raises(sa.InconsistentCheckpointsError, match=rf"'q.weight' is float32 in .*step_0.safetensors but {kind} in "
                                                 r".*step_1.safetensors, which is not read"):
        sa.ingest(src, tmp_path / "r.zarr", progress=False)


def test_a_float64_runs_rebuilt_weights_say_the_base_is_rounded(tmp_path):
    """The float32 base rounds a float64 checkpoint (5e-8 on sigma where the guide's bound said 3e-14)."""
    src = tmp_path / "src"
    src.mkdir()
    for dtype, folder in ((torch.float64, "f64"), (torch.float32, "f32")):
        (src / folder).mkdir()
        for k, w in enumerate(_weights(3)):
            save_file({"l.weight": torch.from_numpy(w).to(dtype) * 1.1}, str(src / folder / f"step_{k}.safetensors"))
        ws = sa.ingest(src / folder, tmp_path / f"{folder}.zarr", progress=False).weight_spectra(cache=False)
        assert ("float32 base rounds" in ws.attrs["source"]) == (dtype == torch.float64)
    assert Store.open(str(tmp_path / "f64.zarr")).commit_record["base_exact"] is False
    assert Store.open(str(tmp_path / "f32.zarr")).commit_record["base_exact"] is True


@pytest.mark.parametrize("later", [torch.float32, torch.bfloat16])
def test_the_first_new_checkpoint_is_compared_with_the_stores_last_not_an_earlier_file(tmp_path, later):
    """The store's last checkpoint (bfloat16, step 20) had its file deleted while an earlier one (float32,
    step 10) stayed: the new one was compared with step 10, so a float32 step 30 was not told and a bfloat16
    one was told a change that did not happen."""
    src = tmp_path / "src"
    src.mkdir()
    ws = _weights(4)
    for k, dtype in enumerate((torch.float32, torch.float32, torch.bfloat16)):
        save_file({"l.weight": torch.from_numpy(ws[k]).to(dtype)}, str(src / f"step_{10 * k}.safetensors"))
    _told(sa.ingest, src, tmp_path / "r.zarr", progress=False)
    (src / "step_20.safetensors").unlink()
    save_file({"l.weight": torch.from_numpy(ws[3]).to(later)}, str(src / "step_30.safetensors"))
    _, caught = _told(sa.ingest, src, tmp_path / "r.zarr", progress=False)
    told = [str(w.message) for w in caught if issubclass(w.category, PrecisionChangeWarning)]
    if later == torch.bfloat16:
        assert told == []
    else:
        assert len(told) == 1 and "bfloat16 at step 20" in told[0] and "float32 at step 30" in told[0]


def test_remote_checkpoints_are_each_compared_with_the_one_right_before(tmp_path):
    """step_0.pt float32, step_10.pt bfloat16 (a pickle read late), step_20.safetensors float32: the upfront
    comparison paired steps 0 and 20 and the change back at step 20 was never told."""
    import io

    from safetensors.torch import save

    fs = fsspec.filesystem("memory")
    ws = _weights(3)

    def pickled(t):
        buf = io.BytesIO()
        torch.save({"l.weight": t}, buf)
        return buf.getvalue()

    fs.pipe("/dtypes-mixed/step_0.pt", pickled(torch.from_numpy(ws[0])))
    fs.pipe("/dtypes-mixed/step_10.pt", pickled(torch.from_numpy(ws[1]).to(torch.bfloat16)))
    fs.pipe("/dtypes-mixed/step_20.safetensors", save({"l.weight": torch.from_numpy(ws[2])}))
    try:
        _, caught = _told(sa.ingest, "memory:///dtypes-mixed", tmp_path / "r.zarr", progress=False)
    finally:
        fs.rm("/dtypes-mixed", recursive=True)
    told = [str(w.message) for w in caught if issubclass(w.category, PrecisionChangeWarning)]
    assert len(told) == 2
    assert "float32 at step 0" in told[0] and "bfloat16 at step 10" in told[0]
    assert "bfloat16 at step 10" in told[1] and "float32 at step 20" in told[1]


def test_remote_pickles_tell_their_unread_weights_once(tmp_path):
    fs = fsspec.filesystem("memory")
    for k, w in enumerate(_weights(4)):
        torch.save({"l.weight": torch.from_numpy(w), "q.weight": torch.ones(4, 4, dtype=torch.int8)}, tmp_path / "x.pt")
        fs.pipe(f"/dtypes-unread/step_{k}.pt", (tmp_path / "x.pt").read_bytes())
    try:
        _, caught = _told(sa.ingest, "memory:///dtypes-unread", tmp_path / "r.zarr", progress=False)
    finally:
        fs.rm("/dtypes-unread", recursive=True)
    assert len([w for w in caught if issubclass(w.category, UnreadWeightsWarning)]) == 1


def test_a_weight_not_read_in_the_store_and_read_now_is_named_so(tmp_path):
    model = _quantised_model()
    recorder = sa.Recorder(tmp_path / "r.zarr", model)
    _told(recorder.step, 0)
    _told(recorder.step, 1)
    model.q.weight = torch.ones(4, 4)  # dequantised: read now
    with pytest.raises(sa.InconsistentCheckpointsError, match=r"'q.weight' is int8 in .*r\.zarr, which is not read"):
        _told(sa.Recorder(tmp_path / "r.zarr", model).step, 2)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        torch.save({"l.weight": torch.full((4, 4), float(k)), "q.weight": torch.ones(4, 4, dtype=torch.int8)},
                   src / f"step_{k}.pt")
    _told(sa.ingest, src, tmp_path / "s.zarr", progress=False)
    for k in range(2):
        (src / f"step_{k}.pt").unlink()
    torch.save({"l.weight": torch.full((4, 4), 2.0), "q.weight": torch.ones(4, 4)}, src / "step_2.pt")
    with pytest.raises(sa.StoreExistsError, match=r"'q.weight' is int8 in the store's checkpoints, which is not "
                                                  r"read \(only floating-point tensors are\), but is read in these"):
        sa.ingest(src, tmp_path / "s.zarr", progress=False)
