"""The ingest's delta arithmetic end to end (pipeline.write_rows, appends, the Recorder), adversarially.

Every stored delta is compared bit for bit (as uint32) with a plain numpy computation: the float64
difference of the two checkpoints rounded to float32 (the guide: "d_i = float32(theta_i - theta_{i-1})";
for float16 / bfloat16 / float32 sources the float64 difference rounded once is the float32 difference,
double rounding being innocuous at 53 >= 2 * 24 + 2 bits). Per-row norms are compared with math.fsum.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.errors import SourceError
from spectral_analyzer.ingest import pipeline
from spectral_analyzer.ingest.anomalies import squared_norm
from spectral_analyzer.store import Store

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
EXACT_IN_FLOAT32 = [torch.float16, torch.bfloat16, torch.float32]


# -- helpers -------------------------------------------------------------------------------------


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _write(src: Path, states) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for step, state in states:
        save_file({k: v.contiguous() for k, v in state.items()}, str(src / f"step{step}.safetensors"))


def _flat64(state) -> np.ndarray:
    return np.concatenate([state[k].reshape(-1).double().numpy() for k in sorted(state, key=_natural)])


def _expected(states) -> list[np.ndarray]:
    thetas = [_flat64(s) for _, s in states]
    return [(c - p).astype(np.float32) for p, c in zip(thetas, thetas[1:])]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _check_store(store: Path, states) -> None:
    """Deltas, base, last_theta bit for bit; each row's recorded norm against math.fsum."""
    run = sa.open_run(store)
    st_ = Store.open(str(store))
    deltas = run.deltas.values
    expected = _expected(states)
    assert deltas.shape[0] == len(expected)
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(_bits(deltas[i]), _bits(e), err_msg=f"row {i}")
        ref = math.sqrt(math.fsum(float(x) * float(x) for x in e.tolist()))
        norm = st_.sources_at(i + 1)[0]["delta_norm"]
        assert norm == pytest.approx(ref, rel=1e-12, abs=0.0)
    np.testing.assert_array_equal(_bits(run.base.values), _bits(_flat64(states[0][1]).astype(np.float32)))
    last = st_.read_last_theta(0, st_.n_params)
    np.testing.assert_array_equal(_bits(last), _bits(_flat64(states[-1][1]).astype(np.float32)))


def _finite(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(values).to(dtype)
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=dtype))


def _random_states(rng, names, shapes, n_ck, dtypes, change_dtype):
    fixed = {n: dtypes[rng.integers(0, len(dtypes))] for n in names}
    states = []
    for s in range(n_ck):
        state = {}
        for n in names:
            size = int(np.prod(shapes[n]))
            kind = rng.integers(0, 4)
            if kind == 0:  # any magnitude a float32 holds, subnormals included
                x = rng.standard_normal(size) * 10.0 ** rng.integers(-45, 38, size)
            elif kind == 1:  # signed zeros: -0.0 deltas
                x = np.where(rng.random(size) < 0.5, 0.0, -0.0)
            else:
                x = rng.standard_normal(size) * 10.0 ** rng.integers(-3, 1)
            dtype = dtypes[rng.integers(0, len(dtypes))] if change_dtype else fixed[n]
            state[n] = _finite(x, dtype).reshape(shapes[n])
        states.append((10 * s, state))
    return states


def _quiet_ingest(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical-contents and outlier warnings of random data
        return sa.ingest(*args, **kwargs)


_models = st.fixed_dictionaries({
    "names": st.lists(st.sampled_from(["a.w", "b.w", "layers.2.x", "layers.10.x", "z"]), min_size=1, max_size=4,
                      unique=True),
    "seed": st.integers(0, 2**32 - 1),
    "n_ck": st.integers(2, 4),
    "chunk": st.sampled_from(["1", "2", "3", "7", "p-1", "p", "p+1", "1000"]),
    "change_dtype": st.booleans(),
})


def _chunk(spec: str, p: int) -> int:
    """A chunk size from its spec: a number, or p (the model's size) give or take one."""
    if spec.startswith("p"):
        return max(1, p + int(spec[1:] or 0))
    return int(spec)


# -- what holds today ----------------------------------------------------------------------------


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=_models)
def test_every_dtype_any_chunking_bit_for_bit(tmp_path_factory, model):
    """Any source dtype, the dtype of a tensor changing between checkpoints, tensors not multiples of the
    chunk, chunks of 1, smaller than a tensor, and larger than the whole model."""
    rng = np.random.default_rng(model["seed"])
    shapes = {n: tuple(int(s) for s in rng.integers(1, 10, rng.integers(1, 3))) for n in model["names"]}
    states = _random_states(rng, model["names"], shapes, model["n_ck"], DTYPES, model["change_dtype"])
    p = sum(int(np.prod(s)) for s in shapes.values())
    work = tmp_path_factory.mktemp("h")
    _write(work / "src", states)
    _quiet_ingest(work / "src", work / "r.zarr", chunk_size=_chunk(model["chunk"], p))
    _check_store(work / "r.zarr", states)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=_models, split=st.integers(1, 3), drop_old=st.booleans())
def test_appends_from_the_file_or_the_stores_copy_bit_for_bit(tmp_path_factory, model, split, drop_old):
    """An append's previous theta from the folder's file, or (old files rotated away) from the store's own
    float32 copy: exact for float16 / bfloat16 / float32 sources (float64: see the tests of the store's copy below)."""
    rng = np.random.default_rng(model["seed"])
    shapes = {n: (int(rng.integers(1, 12)),) for n in model["names"]}
    n_ck = model["n_ck"] + 1
    split = min(split, n_ck - 1)
    states = _random_states(rng, model["names"], shapes, n_ck, EXACT_IN_FLOAT32, model["change_dtype"])
    p = sum(s[0] for s in shapes.values())
    work = tmp_path_factory.mktemp("a")
    _write(work / "src", states[:split])
    _quiet_ingest(work / "src", work / "r.zarr", chunk_size=_chunk(model["chunk"], p))
    if drop_old:
        for f in (work / "src").iterdir():
            f.unlink()
    _write(work / "src", states[split:])
    _quiet_ingest(work / "src", work / "r.zarr")
    _check_store(work / "r.zarr", states)


def _without_scratch(snap: dict) -> dict:
    # last_theta's other slot is scratch space a failed append may leave rewritten (docs/guide.md)
    return {k: v for k, v in snap.items() if not k.startswith("last_theta/c/")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "where",
    ["first", "middle", "last", "chunk-start", "chunk-end", "append-new", "append-last"],
)
def test_nan_or_inf_anywhere_is_named_and_changes_nothing(tmp_path, dtype, where):
    """One bad value, anywhere: a one-line NonFiniteError naming tensor and step; no store, or the store
    as it was. chunk_size 4 over tensors of 10 and 7 values: tensors spanning chunks, boundaries inside them."""
    n_ck, chunk = 4, 4
    states = [(10 * s, {"a.w": torch.randn(10, dtype=torch.float64).to(dtype),
                        "b.w": torch.randn(7, dtype=torch.float64).to(dtype)}) for s in range(n_ck)]
    bad_ck, name, pos = {"first": (0, "a.w", 3), "middle": (1, "b.w", 6), "last": (3, "a.w", 9),
                         "chunk-start": (2, "b.w", 2),  # parameter 12: first of chunk 3
                         "chunk-end": (2, "b.w", 1),  # parameter 11: last of chunk 2
                         "append-new": (3, "b.w", 0), "append-last": (3, "a.w", 4)}[where]
    value = [float("nan"), float("inf"), -float("inf")][pos % 3]
    states[bad_ck][1][name][pos] = value
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    before = None
    if where.startswith("append"):
        _write(src, states[:2] if where == "append-new" else states[:3])
        sa.ingest(src, store, chunk_size=chunk)
        before = snapshot(store)
        _write(src, states[2:] if where == "append-new" else states[3:])
    else:
        _write(src, states)
    with pytest.raises(sa.NonFiniteError) as caught:
        sa.ingest(src, store, chunk_size=chunk)
    message = str(caught.value)
    assert f"'{name}' at step {10 * bad_ck}" in message and "1 NaN/Inf" in message and "\n" not in message
    if before is None:
        with pytest.raises(sa.StoreError, match="no store here"):
            sa.open_run(store)
    else:
        assert _without_scratch(snapshot(store)) == _without_scratch(before)
        assert sa.open_run(store).n_deltas == (1 if where == "append-new" else 2)


def _tamper_in_place(path: Path, state) -> None:
    """Rewrite a checkpoint with other values of the same size, its mtime restored: what size and mtime
    cannot tell from the file ingested."""
    stat = path.stat()
    save_file(state, str(path))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_an_append_takes_the_previous_values_from_the_store_not_a_file_changed_in_place(tmp_path):
    """float32 sources: the store's copy of its last checkpoint is exact, so an append takes its previous
    values from there; the folder's file at that step, rewritten with other (even NaN) values under the
    same size and mtime, is not read, and the deltas are those of the checkpoints ingested."""
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    states = [(s, {"w": torch.full((5,), float(s))}) for s in (0, 1, 2)]
    _write(src, states[:2])
    sa.ingest(src, store, chunk_size=2)
    bad = torch.full((5,), 7.0)
    bad[3] = float("nan")
    _tamper_in_place(src / "step1.safetensors", {"w": bad})
    _write(src, states[2:])
    sa.ingest(src, store)
    _check_store(store, states)


def test_a_float64_previous_file_changed_in_place_is_refused_against_the_store_s_checksums(tmp_path):
    """float64 sources that float32 rounds: the append must read the previous file; its values, rewritten
    under the same size and mtime, do not match the checksums of the store's float32 copy: refused in one
    line, the store as it was. A NaN written there is named as before."""
    states = _tiny_float64_run(tmp_path)
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    _write(src, states[:2])
    sa.ingest(src, store)
    _tamper_in_place(src / "step1.safetensors", {"w": torch.tensor([1.5, 0.1], dtype=torch.float64)})
    _write(src, states[2:])
    before = snapshot(store)
    with pytest.raises(sa.StoreExistsError, match=r"the checkpoint at step 1, .*step1\.safetensors, differs from the "
                                                  r"one ingested: its values are not the store's copy"):
        sa.ingest(src, store)
    assert _without_scratch(snapshot(store)) == _without_scratch(before)
    _tamper_in_place(src / "step1.safetensors", {"w": torch.tensor([float("nan"), 0.1], dtype=torch.float64)})
    with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*step1\.safetensors.* 1 NaN/Inf"):
        sa.ingest(src, store)
    assert _without_scratch(snapshot(store)) == _without_scratch(before)
    _tamper_in_place(src / "step1.safetensors", dict(states[1][1]))
    _quiet_ingest(src, store)
    _check_store(store, states)


def test_every_change_of_precision_is_named(tmp_path):
    """float32 -> bfloat16 -> float16 -> float64: the warning named the first change only, though each later
    delta across a change holds its rounding too."""
    base = torch.linspace(-1, 1, 12)
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float64]
    states = [(s, {"a": (base + s * 1e-3).to(d)}) for s, d in enumerate(dtypes)]
    src = tmp_path / "src"
    _write(src, states)
    with pytest.warns(sa.PrecisionChangeWarning) as caught:
        sa.ingest(src, tmp_path / "r.zarr")
    (message,) = [str(w.message) for w in caught if w.category is sa.PrecisionChangeWarning]
    assert message.startswith("tensor 'a' is float32 at step 1 (")
    assert message.endswith("; precisions change again in the deltas to steps 3, 4")


def test_a_group_of_empty_tensors_gives_nan_quietly(tmp_path):
    """A (3, 0) tensor's group: NaN margin and noise level, with numpy's divide-by-zero warning printed."""
    src = tmp_path / "src"
    _write(src, [(s, {"a": torch.randn(5, generator=torch.Generator().manual_seed(s)), "e": torch.zeros(3, 0)})
                 for s in range(5)])
    ds = sa.ingest(src, tmp_path / "r.zarr").spectra(window=3, group_by="tensor")
    empty = ds.sel(group="e")
    assert int(empty.n_params) == 0 and np.isnan(empty.margin.values).all()


def test_a_change_of_precision_between_checkpoints_is_exact_and_warned_once(tmp_path):
    """float32, then bfloat16: the deltas are the exact differences of the stored values, and the one across
    the change is named in a PrecisionChangeWarning (kept in the store's warnings) since it holds the
    rounding besides the update."""
    base = torch.linspace(-1, 1, 12)
    states = [(0, {"a": base, "b": base.clone()}), (1, {"a": base + 1e-3, "b": base.clone()}),
              (2, {"a": (base + 2e-3).to(torch.bfloat16), "b": base.to(torch.bfloat16)}),
              (3, {"a": (base + 3e-3).to(torch.bfloat16), "b": base.to(torch.bfloat16)})]
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    _write(src, states[:3])
    with pytest.warns(sa.PrecisionChangeWarning) as caught:
        sa.ingest(src, store)
    (message,) = [str(w.message) for w in caught if w.category is sa.PrecisionChangeWarning]
    assert message.startswith("tensor 'a' is float32 at step 1 (") and "but bfloat16 at step 2 (" in message
    assert "(and 1 more tensors)" in message and "\n" not in message
    _write(src, states[3:])
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        sa.ingest(src, store)
    assert not [w for w in later if w.category is sa.PrecisionChangeWarning]  # the change is not in the new rows
    _check_store(store, states)
    assert sa.open_run(store).warnings.count(message) == 1


def test_a_checkpoint_replaced_after_it_was_planned_is_refused_not_read_as_planned(tmp_path, monkeypatch):
    """Headers are read first (the plan), the tensors later: a file replaced in between by one of another
    shape or dtype is refused in one line naming it, and no store is left."""
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    _write(src, [(s, {"w": torch.full((8, 8), float(s))}) for s in (0, 1, 2)])
    plan = pipeline._preflight

    for replacement in (torch.zeros(4, 16), torch.zeros(8, 8, dtype=torch.float16)):
        def replaced_after_planning(*args, replacement=replacement, **kwargs):
            planned = plan(*args, **kwargs)
            save_file({"w": replacement}, str(src / "step2.safetensors"))
            return planned

        monkeypatch.setattr(pipeline, "_preflight", replaced_after_planning)
        with pytest.raises(sa.InconsistentCheckpointsError, match=r"step2\.safetensors as opened to be read") as caught:
            sa.ingest(src, store)
        assert "\n" not in str(caught.value)
        with pytest.raises(sa.StoreError, match="no store here"):
            sa.open_run(store)
        save_file({"w": torch.full((8, 8), 2.0)}, str(src / "step2.safetensors"))


def test_float64_delta_rounding_at_the_edge_of_float32(tmp_path):
    """A float64 delta just below float32's overflow threshold rounds to FLT_MAX and is kept; the threshold
    itself (FLT_MAX + half an ulp, a tie to even: infinity) is refused by name (the checkpoint's own value
    cannot be held in float32 either)."""
    flt_max = float(np.finfo(np.float32).max)
    threshold = flt_max + 2.0 ** (127 - 24)  # half an ulp of FLT_MAX (2**104)
    below = math.nextafter(threshold, 0.0)
    f64 = torch.float64
    for name, top, ok in (("below", below, True), ("tie", threshold, False)):
        src = tmp_path / name
        states = [(0, {"w": torch.tensor([0.0, 1.0], dtype=f64)}), (1, {"w": torch.tensor([top, 1.0], dtype=f64)}),
                  (2, {"w": torch.tensor([0.0, 1.0], dtype=f64)})]
        _write(src, states)
        if ok:
            run = _quiet_ingest(src, tmp_path / f"{name}.zarr")
            assert run.deltas.values[0, 0] == np.float32(flt_max)
            assert run.deltas.values[1, 0] == -np.float32(flt_max)
        else:
            with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*1 of its values overflow float32"):
                sa.ingest(src, tmp_path / f"{name}.zarr")


def test_negative_zero_deltas_are_stored_not_dropped_as_fill(tmp_path):
    """A chunk of -0.0 deltas is not the fill value: stored bit for bit (its crc32c is not the zeros')."""
    states = [(0, {"w": torch.zeros(4)}), (1, {"w": -torch.zeros(4)}), (2, {"w": torch.ones(4)})]
    _write(tmp_path / "src", states)
    _quiet_ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=2)
    _check_store(tmp_path / "r.zarr", states)
    assert (sa.open_run(tmp_path / "r.zarr").deltas.values[0].view(np.uint32) == 0x80000000).all()


def test_squared_norm_across_blocks_matches_fsum():
    rng = np.random.default_rng(7)
    n = (1 << 20) + 12345  # more than one of squared_norm's blocks
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    ref = math.fsum((x.astype(np.float64) ** 2).tolist())
    assert squared_norm(x) == pytest.approx(ref, rel=1e-13, abs=0.0)


def test_recorder_matches_ingest_for_mixed_dtypes_and_strided_params(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(5, 3).t())  # not contiguous
            self.b = torch.nn.Parameter(torch.randn(7).half())
            self.c = torch.nn.Parameter(torch.randn(4, 2).bfloat16())
            self.e = torch.nn.Parameter(torch.randn(3).double())
            self.register_buffer("n", torch.arange(3))  # not floating: not recorded

    torch.manual_seed(3)
    model = M()
    rec = sa.Recorder(tmp_path / "live.zarr", model, chunk_size=4)
    (tmp_path / "src").mkdir()
    for s in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, dtype=torch.float64).to(p.dtype) * 1e-2)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / "src" / f"s{s}.safetensors"))
        rec.record(s)
    live = sa.open_run(tmp_path / "live.zarr")
    saved = sa.ingest(tmp_path / "src", tmp_path / "saved.zarr", chunk_size=4)
    np.testing.assert_array_equal(live.deltas.values.view(np.uint32), saved.deltas.values.view(np.uint32))
    np.testing.assert_array_equal(live.base.values.view(np.uint32), saved.base.values.view(np.uint32))


# -- where the previous theta comes from, and what may be trusted --------------------------------


def _tiny_float64_run(tmp_path):
    """float64 weights moving by 1e-9 a step: far below float32's resolution of the weights themselves."""
    return [(s, {"w": torch.tensor([1.0 + s * 1e-9, 0.1 + s * 1e-9], dtype=torch.float64)}) for s in range(3)]


def test_float64_append_without_the_previous_file_is_refused_not_rounded(tmp_path):
    """The store's copy of its last checkpoint is float32: for float64 values it rounds, an append whose
    previous file is gone is refused in one line (deltas from the rounded copy would be 2e-9 and 5.1e-10,
    not 1e-9 and 1e-9), the store unchanged; with the file there, the append is the formula."""
    states = _tiny_float64_run(tmp_path)
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    _write(src, states[:2])
    sa.ingest(src, store)
    for f in src.iterdir():
        f.unlink()  # rotated away, as HF's save_total_limit does
    _write(src, states[2:])
    before = snapshot(store)
    with pytest.raises(sa.StepError, match=r"last step 1 is not in the folder, and the store's float32 copy of it "
                                           r"rounds its float64 values"):
        sa.ingest(src, store)
    assert _without_scratch(snapshot(store)) == _without_scratch(before)
    _write(src, states[1:2])
    _quiet_ingest(src, store)
    _check_store(store, states)


def test_float64_values_that_float32_holds_append_from_the_stores_copy(tmp_path):
    """float64 checkpoints whose values float32 holds exactly (a float32 training saved in float64): the
    store's copy is exact, and an append without the previous file is the formula."""
    states = [(s, {"w": torch.tensor([1.0 + s / 8, 0.5 - s / 16], dtype=torch.float64)}) for s in range(3)]
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    _write(src, states[:2])
    sa.ingest(src, store)
    for f in src.iterdir():
        f.unlink()
    _write(src, states[2:])
    _quiet_ingest(src, store)
    _check_store(store, states)


def test_float64_recorder_resumed_at_its_last_step_is_the_formula(tmp_path):
    """Training resumed at the store's last step: the model holds that checkpoint, and the recorder takes its
    next delta from a snapshot of it, not from the store's float32 copy (which rounds float64 values)."""
    states = _tiny_float64_run(tmp_path)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(states[0][1]["w"].clone())
    store = tmp_path / "live.zarr"
    rec = sa.Recorder(store, model)
    for step in (0, 1):
        with torch.no_grad():
            model.w.copy_(states[step][1]["w"])
        rec.record(step)
    resumed = sa.Recorder(store, model)  # the training process restarts from its checkpoint at step 1
    resumed.resume(1)
    with torch.no_grad():
        model.w.copy_(states[2][1]["w"])
    resumed.record(2)
    deltas = sa.open_run(store).deltas.values
    np.testing.assert_array_equal(_bits(deltas), _bits(np.stack(_expected(states))))


def _fill(model, value):
    with torch.no_grad():
        model.weight.fill_(value)


def test_a_recorder_does_not_subtract_a_snapshot_the_store_has_moved_past(tmp_path):
    """A second recorder appended step 20: the first one's next record is refused in one line (its snapshot at
    10 would give 5.0 for a row labelled 20 -> 30, and the store's step 20 may be another training's weights),
    and the store keeps the rows it had."""
    model = torch.nn.Linear(2, 1, bias=False)
    store = tmp_path / "r.zarr"
    first = sa.Recorder(store, model)
    _fill(model, 0.0)
    first.record(0)
    _fill(model, 1.0)
    first.record(10)
    second = sa.Recorder(store, model)  # e.g. a notebook cell run again, the old callback still attached
    _fill(model, 3.0)
    second.record(20)
    _fill(model, 6.0)
    with pytest.raises(sa.StoreError, match="another writer changed the rows") as refused:
        first.record(30)
    assert "\n" not in str(refused.value)
    run = sa.open_run(store)
    assert list(run.checkpoint_steps) == [0, 10, 20]
    assert run.deltas.values[:, 0].tolist() == [1.0, 2.0]


def test_a_recorder_interrupted_after_its_commit_does_not_reuse_its_old_snapshot(tmp_path, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C in a notebook) after the row at 20 was committed, while its metrics were
    written: the row stays, and the next delta is taken from the snapshot at 20, not the one at 10."""
    model = torch.nn.Linear(2, 1, bias=False)
    rec = sa.Recorder(tmp_path / "r.zarr", model)
    _fill(model, 0.0)
    rec.step(0, loss=1.0)
    _fill(model, 1.0)
    rec.step(10, loss=1.0)
    real = sa.Recorder._write_metrics

    def interrupted(self, store):
        raise KeyboardInterrupt

    monkeypatch.setattr(sa.Recorder, "_write_metrics", interrupted)
    _fill(model, 3.0)
    with pytest.raises(KeyboardInterrupt):
        rec.step(20, loss=1.0)
    monkeypatch.setattr(sa.Recorder, "_write_metrics", real)
    _fill(model, 6.0)
    rec.step(30, loss=1.0)
    run = sa.open_run(tmp_path / "r.zarr")
    steps = [int(s) for s in run.checkpoint_steps]
    values = run.deltas.values[:, 0].tolist()
    theta = {0: 0.0, 10: 1.0, 20: 3.0, 30: 6.0}
    assert values == [theta[b] - theta[a] for a, b in zip(steps, steps[1:])]


def test_a_truncated_store_never_serves_its_stale_last_theta(tmp_path, monkeypatch):
    """After a truncation the store's copy of theta holds the abandoned training's step 30. The redone
    training's rows reach step 30 again without a final commit (a source failing: the rows so far are kept)
    and the file at 30 is rotated away: the append is refused in one line, never a delta from the stale
    copy (4.0 where the formula gives 1.0)."""
    src, store = tmp_path / "src", tmp_path / "r.zarr"

    def checkpoint(step, value):
        _write(src, [(step, {"w": torch.full((3,), float(value))})])

    for step, value in ((0, 0), (10, 1), (20, 2), (30, 3)):
        checkpoint(step, value)
    sa.ingest(src, store)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.full((3,), 1.0))  # the training resumed from its step-10 checkpoint
    with pytest.warns(sa.RecordingWarning, match="dropping the 2 rows"):
        sa.Recorder(store, model).resume(10)
    for step, value in ((20, 5), (30, 6), (40, 7)):  # the redone training's checkpoints
        checkpoint(step, value)
    real = pipeline.open_checkpoint
    opened = []

    def flaky(files, label, keys):
        if "step40" in str(label):
            opened.append(label)
            if len(opened) > 1:  # its header was read when the ingest was planned; its tensors now fail
                raise SourceError(f"{label}: the connection was reset")
        return real(files, label, keys)

    monkeypatch.setattr(pipeline, "open_checkpoint", flaky)
    with pytest.raises(SourceError):
        sa.ingest(src, store)
    monkeypatch.setattr(pipeline, "open_checkpoint", real)
    assert list(sa.open_run(store).checkpoint_steps) == [0, 10, 20, 30]
    for step in (0, 10, 20, 30):
        (src / f"step{step}.safetensors").unlink()
    before = sa.open_run(store).deltas.values
    with pytest.raises(sa.StepError, match="last step 30 is not in the folder and the store's copy of it was not"):
        sa.ingest(src, store)  # the store's copy holds the abandoned training's step 30, and says so
    np.testing.assert_array_equal(sa.open_run(store).deltas.values, before)
    checkpoint(30, 6)
    run = sa.ingest(src, store)
    assert run.deltas.values[:, 0].tolist() == [1.0, 4.0, 1.0, 1.0]


def test_a_float64_checkpoint_beyond_float32_is_refused_wherever_it_is(tmp_path):
    """float64 values float32 cannot hold are refused at every checkpoint, not only the first and last
    (2e38 -> 4e38 -> 2.5e38: the deltas fit, base + d_1 would not)."""
    states = [(s, {"w": torch.tensor([v, 1.0], dtype=torch.float64)}) for s, v in ((0, 2e38), (1, 4e38), (2, 2.5e38))]
    _write(tmp_path / "src", states)
    with pytest.raises(sa.NonFiniteError, match=r"'w' at step 1 .*overflow float32"):
        sa.ingest(tmp_path / "src", tmp_path / "r.zarr")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "300"])
def test_a_chunk_size_that_is_not_a_positive_integer_is_refused_in_one_line(tmp_path, bad):
    _write(tmp_path / "src", [(0, {"w": torch.zeros(3)}), (1, {"w": torch.ones(3)})])
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer .*, got "):
        sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=bad)
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer"):
        sa.Recorder(tmp_path / "live.zarr", torch.nn.Linear(2, 2), chunk_size=bad)
    assert not (tmp_path / "r.zarr").exists() and not (tmp_path / "live.zarr").exists()
    assert sa.ingest(tmp_path / "src", tmp_path / "ok.zarr", chunk_size=np.int64(2)).n_params == 3
