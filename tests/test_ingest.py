from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import FIXTURES, LAYOUTS, expected_deltas, flat_theta, layout_checkpoints, load_state, write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import spectral_analyzer as sa


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_deltas_bit_identical(layout, tmp_path):
    run = sa.ingest(FIXTURES / "layouts" / layout, tmp_path / "run.zarr")
    checkpoints = layout_checkpoints(layout)
    expected = expected_deltas(checkpoints)
    got = run.deltas.values
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert list(run.checkpoint_steps) == [0, 10, 20, 30]
    assert list(run.steps) == [10, 20, 30]
    base = torch.cat([t.float() for t in flat_theta(load_state(checkpoints[0]))]).numpy()
    assert np.array_equal(run.base.values, base)


def test_layouts_agree_on_manifest(tmp_path):
    runs = {name: sa.ingest(FIXTURES / "layouts" / name, tmp_path / f"{name}.zarr") for name in LAYOUTS}
    names = {name: list(r.tensors["tensor"].values) for name, r in runs.items()}
    reference = names["hf_trainer"]
    assert all(n == reference for n in names.values())
    # integer buffers are skipped, canonical order is natural order
    assert "norm.num_batches_tracked" not in reference
    assert reference.index("layers.1.0.bias") < reference.index("norm.bias")
    assert set(runs["hf_sharded"].tensors["dtype"].values) == {"bfloat16"}
    t = runs["hf_trainer"].tensors
    assert int(t["offset"][-1] + t["size"][-1]) == runs["hf_trainer"].n_params


@pytest.mark.parametrize("run_name", ["wd1", "wd0"])
def test_grokking_fixture(run_name, tmp_path):
    folder = FIXTURES / "grokking" / run_name
    run = sa.ingest(folder, tmp_path / "g.zarr")
    files = sorted(folder.glob("*.safetensors"))
    assert run.n_deltas == len(files) - 1 >= 40
    expected = expected_deltas([[f] for f in files])
    assert np.array_equal(run.deltas.values.view(np.uint32), expected.view(np.uint32))
    m = run.metrics  # metrics.csv beside the checkpoints is picked up
    assert {"train_loss", "test_acc", "lr"} <= set(m.data_vars)
    assert list(m["step"].values) == list(run.checkpoint_steps)


def test_planted_fixture_round_trip(tmp_path):
    run = sa.ingest(FIXTURES / "planted", tmp_path / "p.zarr", chunk_size=5000)
    files = sorted((FIXTURES / "planted").glob("*.safetensors"))
    expected = expected_deltas([[f] for f in files])
    assert np.array_equal(run.deltas.values.view(np.uint32), expected.view(np.uint32))
    planted = json.loads((FIXTURES / "planted" / "planted.json").read_text())
    assert run.n_params == planted["p"]


def test_hf_metrics_from_newest_trainer_state(tmp_path):
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", tmp_path / "r.zarr")
    m = run.metrics
    assert list(m["step"].values) == [0, 10, 20, 30]
    assert m["eval_loss"].sel(step=30).item() == pytest.approx(2.5 - 0.24)
    assert m["loss"].sel(step=20).item() == pytest.approx(2.2)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_metrics_file_option(suffix, tmp_path):
    path = tmp_path / f"log{suffix}"
    if suffix == ".csv":
        path.write_text("step,loss,acc\n0,1.0,0.1\n20,0.5,\n30,0.25,0.9\n")
    else:
        path.write_text('{"step": 0, "loss": 1.0, "acc": 0.1}\n{"step": 20, "loss": 0.5}\n{"step": 30, "loss": 0.25, "acc": 0.9}\n')
    run = sa.ingest(FIXTURES / "layouts" / "plain_pt", tmp_path / "r.zarr", metrics=path)
    m = run.metrics
    assert list(m["step"].values) == [0, 20, 30]
    assert np.isnan(m["acc"].sel(step=20).item())
    assert m["loss"].sel(step=30).item() == 0.25


def test_xarray_and_zarr_read_the_store(tmp_path):
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", tmp_path / "r.zarr")
    ds = xr.open_zarr(tmp_path / "r.zarr", consolidated=False)
    assert ds["deltas"].dims == ("delta", "param")
    assert np.array_equal(ds["deltas"].values, run.deltas.values)
    assert list(ds["step"].values) == [10, 20, 30]
    metrics = xr.open_zarr(tmp_path / "r.zarr", group="metrics", consolidated=False)
    assert "eval_loss" in metrics


def test_append_reads_only_new_checkpoints(tmp_path):
    src = tmp_path / "ckpts"
    sizes = {"a": (37, 11), "b": (101,)}
    paths = write_run(src, 8, sizes, seed=3)
    full = sa.ingest(src, tmp_path / "full.zarr", chunk_size=100)
    for p in paths[5:]:
        p.rename(tmp_path / p.name)
    part = sa.ingest(src, tmp_path / "part.zarr", chunk_size=100)
    assert part.n_deltas == 4
    # HF-style rotation: the older checkpoints are gone; only the newest remain.
    for p in paths[:4]:
        p.unlink()
    for p in paths[5:]:
        (tmp_path / p.name).rename(p)
    appended = sa.ingest(src, tmp_path / "part.zarr")
    assert appended.n_deltas == 7
    assert np.array_equal(appended.deltas.values.view(np.uint32), full.deltas.values.view(np.uint32))
    assert list(appended.steps) == list(full.steps)
    # the sources of the appended rows were hashed; the old ones kept
    assert [s["step"] for s in appended.sources] == list(full.checkpoint_steps)


def test_append_uses_stored_theta_when_last_checkpoint_is_gone(tmp_path):
    src = tmp_path / "ckpts"
    paths = write_run(src, 6, {"w": (64, 3)}, seed=5)
    full = sa.ingest(src, tmp_path / "full.zarr", chunk_size=50)
    moved = []
    for p in paths[4:]:
        moved.append(p.rename(tmp_path / p.name))
    sa.ingest(src, tmp_path / "part.zarr", chunk_size=50)
    for p in paths[:4]:
        p.unlink()  # even the store's last checkpoint is gone
    for p, dst in zip(moved, paths[4:]):
        p.rename(dst)
    appended = sa.ingest(src, tmp_path / "part.zarr")
    assert np.array_equal(appended.deltas.values.view(np.uint32), full.deltas.values.view(np.uint32))


def test_reingest_same_folder_is_a_no_op(tmp_path, hf_copy):
    from conftest import snapshot

    sa.ingest(hf_copy, tmp_path / "r.zarr")
    before = snapshot(tmp_path / "r.zarr")
    run = sa.ingest(hf_copy, tmp_path / "r.zarr")
    assert run.n_deltas == 3
    assert snapshot(tmp_path / "r.zarr") == before


def test_another_folder_with_the_same_sizes_and_times_is_compared_by_content(tmp_path):
    """A second run of a sweep (its first checkpoints copied, then its own walk) whose files have the first
    run's sizes and mtimes, as after ``cp -p`` or on a filesystem with coarse times: ingested into the first
    run's store, it is refused; its later rows would have been deltas from the first run's last weights.
    The first run moved to another folder with its times still appends."""
    first = write_run(tmp_path / "a", 7, {"w": (30, 4)}, seed=1)
    (tmp_path / "b").mkdir()
    other = [shutil.copyfile(a, tmp_path / "b" / a.name) for a in first[:4]]
    gen, w = torch.Generator().manual_seed(2), load_file(first[3])["w"]
    for step in (40, 50, 60):  # the same walk's size of step from step 30 on, in other directions
        w = w + 1e-2 * torch.randn(w.shape, generator=gen)
        save_file({"w": w}, tmp_path / "b" / f"step_{step}.safetensors")
        other.append(tmp_path / "b" / f"step_{step}.safetensors")
    for a, b in zip(first, other):
        os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    later = first[6].rename(tmp_path / first[6].name)
    sa.ingest(tmp_path / "a", tmp_path / "r.zarr", chunk_size=64)
    with pytest.raises(sa.StoreExistsError, match=r"holds a different run \(the checkpoint at step 40, .*b/step_40"
                                                  r"\.safetensors, differs from the one ingested\)"):
        sa.ingest(tmp_path / "b", tmp_path / "r.zarr")
    assert sa.open_run(tmp_path / "r.zarr").n_deltas == 5
    moved = shutil.copytree(tmp_path / "a", tmp_path / "moved")  # copy2: times kept, same bytes
    shutil.copy2(later, moved / later.name)
    shutil.copyfile(other[5], moved / "step_50.safetensors")  # the size and time of a's step 50, other bytes
    os.utime(moved / "step_50.safetensors", ns=(first[5].stat().st_atime_ns, first[5].stat().st_mtime_ns))
    with pytest.raises(sa.StoreExistsError, match="the checkpoint at step 50"):
        sa.ingest(moved, tmp_path / "r.zarr")
    shutil.copy2(first[5], moved / "step_50.safetensors")
    assert list(sa.ingest(moved, tmp_path / "r.zarr").checkpoint_steps) == [0, 10, 20, 30, 40, 50, 60]


def test_steps_from_file_contents_and_explicit(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, step in (("first", 5), ("second", 9), ("third", 40)):
        torch.save({"model_state_dict": {"w": torch.randn(4, generator=gen)}, "global_step": step}, src / f"{name}.pt")
    run = sa.ingest(src, tmp_path / "a.zarr")
    assert list(run.checkpoint_steps) == [5, 9, 40]
    for f in src.iterdir():
        obj = torch.load(f, weights_only=True)
        torch.save(obj["model_state_dict"], f)
    with pytest.raises(sa.StepError, match="no step"):
        sa.ingest(src, tmp_path / "b.zarr")
    run = sa.ingest(src, tmp_path / "b.zarr", steps=[1, 2, 3])  # natural name order: first, second, third
    assert list(run.checkpoint_steps) == [1, 2, 3]


def test_tied_weights_in_state_dict_count_once(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    for step in (0, 1):
        emb = torch.full((5, 3), float(step))
        torch.save({"embed.weight": emb, "lm_head.weight": emb, "b": torch.ones(2) * step}, src / f"s_{step}.pt")
    run = sa.ingest(src, tmp_path / "r.zarr")
    assert run.n_params == 15 + 2


def test_include_exclude(tmp_path):
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", tmp_path / "r.zarr", include=["layers.*"], exclude=["*.bias"])
    assert list(run.tensors["tensor"].values) == [f"layers.{i}.{j}.weight" for i in (0, 1) for j in (0, 2)]


sizes_strategy = st.dictionaries(
    st.sampled_from(["a.w", "b.w", "layers.2.x", "layers.10.x", "z"]),
    st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple),
    min_size=1,
    max_size=4,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=sizes_strategy, chunk=st.integers(1, 40), n=st.integers(2, 4), seed=st.integers(0, 1000))
def test_round_trip_any_chunking(tmp_path, sizes, chunk, n, seed):
    work = tmp_path / f"h{seed}-{chunk}-{n}-{abs(hash(tuple(sizes.items())))}"
    paths = write_run(work / "src", n, sizes, seed=seed)
    run = sa.ingest(work / "src", work / "r.zarr", chunk_size=chunk)
    expected = expected_deltas([[p] for p in paths])
    assert np.array_equal(run.deltas.values.view(np.uint32), expected.view(np.uint32))
    shutil.rmtree(work)


def test_fp16_and_float64_sources(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    gen = torch.Generator().manual_seed(1)
    a16, a64 = torch.randn(50, generator=gen).half(), torch.randn(7, generator=gen).double()
    b16, b64 = a16 + 0.01, a64 + 1e-9
    save_file({"h": a16, "d": a64}, str(src / "s_0.safetensors"))
    save_file({"h": b16, "d": b64}, str(src / "s_1.safetensors"))
    run = sa.ingest(src, tmp_path / "r.zarr")
    d = run.deltas.values[0]
    # canonical order: d, h
    assert np.array_equal(d[:7], (b64 - a64).float().numpy())
    assert np.array_equal(d[7:], (b16.float() - a16.float()).numpy())
    assert list(run.tensors["dtype"].values) == ["float64", "float16"]
