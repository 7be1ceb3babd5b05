"""torch.distributed.checkpoint folders: model tensors only, shards assembled, bit-identical to safetensors."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from conftest import assert_same_run, snapshot, trajectory, write_safetensors_run

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.ingest import dcp as dcp_reader
from spectral_analyzer.ingest.dcp import dcp_files
from spectral_analyzer.ingest.readers import KeyOptions, open_checkpoint

STEPS = [0, 10, 20]


def _save(folder: Path, state: dict) -> None:
    with warnings.catch_warnings():  # torch: "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


def _optimizer_state(model: dict[str, torch.Tensor]) -> dict:
    """An Adam-like optimizer state as torch's optimizers give it: per-parameter moments, groups of settings."""
    state = {i: {"step": torch.tensor(5.0), "exp_avg": torch.ones_like(v), "exp_avg_sq": torch.ones_like(v)}
             for i, v in enumerate(model.values())}
    return {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": list(range(len(model)))}]}


def _fsdp_run(root: Path, states: dict[int, dict]) -> Path:
    """accelerate's FSDP layout: checkpoint-<step>/pytorch_model_fsdp_0/ beside optimizer_0/."""
    for step, state in states.items():
        _save(root / f"checkpoint-{step}" / "pytorch_model_fsdp_0", {"model": state})
        _save(root / f"checkpoint-{step}" / "optimizer_0", {"optimizer": _optimizer_state(state)})
    return root


def _torchtitan_run(root: Path, states: dict[int, dict]) -> Path:
    """torchtitan's layout: step-<n>/ with the model's tensors at the top beside optimizer and train state."""
    for step, state in states.items():
        _save(root / f"step-{step}", {**state, "optimizer": _optimizer_state(state),
                                      "train_state": {"step": torch.tensor(step)}, "lr_scheduler": {"last_epoch": step}})
    return root


@pytest.mark.parametrize("layout", [_fsdp_run, _torchtitan_run])
def test_dcp_layouts_bit_identical_to_safetensors(layout, tmp_path):
    states = trajectory(STEPS, dtype=torch.bfloat16)
    run = sa.ingest(layout(tmp_path / "dcp", states), tmp_path / "d.zarr")
    assert_same_run(run, sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr"))


def test_step_stored_in_the_checkpoint(tmp_path):
    _save(tmp_path / "save", {"model": trajectory([0])[0], "step": 1200})
    _save(tmp_path / "titan", {**trajectory([0])[0], "train_state": {"step": torch.tensor(1300)}})
    assert open_checkpoint(dcp_files(tmp_path / "save"), "save", KeyOptions()).step_hint == 1200
    assert open_checkpoint(dcp_files(tmp_path / "titan"), "titan", KeyOptions()).step_hint == 1300


def test_only_model_chunks_are_read(tmp_path, monkeypatch):
    states = trajectory(STEPS)
    src = _torchtitan_run(tmp_path / "tt", states)
    read = []
    original = dcp_reader._read_span
    monkeypatch.setattr(dcp_reader, "_read_span", lambda f, a, b: (read.append((f.parent.name, a, b)), original(f, a, b))[1])
    sa.ingest(src, tmp_path / "t.zarr")
    for step in STEPS:
        md = dcp_reader.load_metadata(src / f"step-{step}" / ".metadata")
        spans = {index.fqn: (f"step-{step}", info.offset, info.offset + info.length)
                 for index, info in md.storage_data.items()}
        mine = [r for r in read if r[0] == f"step-{step}"]
        model = {spans[name] for name in states[step]}
        assert model <= set(mine)
        assert not [r for r in mine if r not in model and r != spans["train_state.step"]]  # no optimizer byte


class _RankPlanner(DefaultSavePlanner):
    """The plan of rank *rank* of two, holding one half of every tensor (rows, or columns of an even-rowed matrix).

    What FSDP's sharded tensors give DCP's planner, without a process group:
    torch's own planner and FileSystemWriter then write the files and
    metadata as the two ranks and their coordinator would.
    """

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def _chunk(self, t: torch.Tensor) -> tuple[list[int], list[int]]:
        dim = 1 if t.dim() == 2 and t.shape[0] % 2 == 0 else 0
        half = -(-t.shape[dim] // 2)
        lo = min(t.shape[dim], self.rank * half)
        offsets, sizes = [0] * t.dim(), list(t.shape)
        offsets[dim], sizes[dim] = lo, min(t.shape[dim], lo + half) - lo
        return offsets, sizes

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, t in self.state_dict.items():
            offsets, sizes = self._chunk(t)
            if 0 not in sizes:
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items.append(WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=chunk, size=t.size(),
                                                                   properties=TensorProperties.create_from_tensor(t))))
        self.plan = SavePlan(items, planner_data=self.mappings)
        return self.plan

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        chunk = item.tensor_data.chunk
        t = self.state_dict[item.index.fqn]
        return t[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))].contiguous()


def _save_two_ranks(state: dict, folder: Path) -> None:
    """DCP's save protocol (local plans, global plan, each rank's writes, the coordinator's metadata) in one process."""
    writer = FileSystemWriter(folder)
    planners = [_RankPlanner(rank) for rank in (0, 1)]
    for rank, planner in enumerate(planners):
        planner.set_up_planner(state, is_coordinator=rank == 0)
    writer.set_up_storage_writer(True)
    local = [writer.prepare_local_plan(p.create_local_plan()) for p in planners]
    global_plans, metadata = planners[0].create_global_plan(local)
    global_plans = writer.prepare_global_plan(global_plans)
    results = [writer.write_data(p.finish_plan(plan), p).value() for p, plan in zip(planners, global_plans)]
    writer.finish(metadata, results)


SHAPES = {"embed.weight": (7, 6), "layers.0.attn.weight": (6, 5), "layers.0.attn.bias": (5,), "norm.weight": (6,),
          "head.weight": (5, 6)}


def test_sharded_tensors_assembled(tmp_path):
    states = trajectory(STEPS, shapes=SHAPES)
    for step, state in states.items():
        _save_two_ranks({"model": state, "optimizer": {"exp_avg": {k: torch.ones_like(v) for k, v in state.items()}}},
                        tmp_path / "fsdp" / f"checkpoint-{step}")
    md = dcp_reader.load_metadata(tmp_path / "fsdp" / "checkpoint-10" / ".metadata")
    assert {len(e.chunks) for e in md.state_dict_metadata.values()} == {2}
    assert md.state_dict_metadata["model.layers.0.attn.weight"].chunks[1].offsets == torch.Size([0, 3])  # columns
    assert {info.relative_path for info in md.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    run = sa.ingest(tmp_path / "fsdp", tmp_path / "s.zarr")
    assert_same_run(run, sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr"))


TWO_PROCESSES = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank, states, out, rendezvous = int(sys.argv[1]), torch.load(sys.argv[2], weights_only=True), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    for step, state in states.items():
        placements = {k: [Shard(i % 2) if v.dim() == 2 else Shard(0) if i % 3 else Replicate()]
                      for i, (k, v) in enumerate(state.items())}
        sharded = {k: distribute_tensor(v, mesh, placements[k]) for k, v in state.items()}
        moments = {k: distribute_tensor(torch.ones_like(v), mesh, placements[k]) for k, v in state.items()}
        dcp.save({"model": sharded, "optimizer": {"exp_avg": moments}}, checkpoint_id=f"{out}/checkpoint-{step}")
    dist.barrier()
    os._exit(0)
''')


@pytest.mark.slow
def test_two_gloo_ranks_with_dtensors(tmp_path):
    """The same through FSDP2's DTensors on two real ranks (two processes: ~10 s, mostly importing torch)."""
    states = trajectory(STEPS, shapes=SHAPES)
    torch.save(states, tmp_path / "states.pt")
    (tmp_path / "writer.py").write_text(TWO_PROCESSES)
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(rank), str(tmp_path / "states.pt"),
                               str(tmp_path / "run"), str(tmp_path / "rendezvous")]) for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    md = dcp_reader.load_metadata(tmp_path / "run" / "checkpoint-10" / ".metadata")
    assert sorted({len(e.chunks) for e in md.state_dict_metadata.values()}) == [1, 2]  # one replicated, saved once
    run = sa.ingest(tmp_path / "run", tmp_path / "s.zarr")
    assert_same_run(run, sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr"))


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "not a pickle":
        path.write_bytes(b"\x00garbage")


@pytest.mark.parametrize("how, message", [
    ("truncated", "unreadable torch.distributed.checkpoint metadata"),
    ("not a pickle", "unreadable torch.distributed.checkpoint metadata"),
])
def test_broken_metadata_one_line_store_kept(how, message, tmp_path):
    states = trajectory([0, 10, 20, 30])
    src = _fsdp_run(tmp_path / "fsdp", {s: states[s] for s in (0, 10, 20)})
    store = tmp_path / "r.zarr"
    sa.ingest(src, store)
    before = snapshot(store)
    _fsdp_run(src, {30: states[30]})
    meta = src / "checkpoint-30" / "pytorch_model_fsdp_0" / ".metadata"
    _damage(meta, how)
    result = CliRunner().invoke(main, ["ingest", str(src), "-o", str(store), "--no-progress"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: {meta}: {message} (")
    assert snapshot(store) == before


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_with_other_objects_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _fsdp_run(tmp_path / "fsdp", trajectory([0, 10]))
    meta = src / "checkpoint-10" / "pytorch_model_fsdp_0" / ".metadata"
    meta.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(sa.UnsafeCheckpointError, match=rf"{meta}: refused to unpickle (posix|os)\.system"):
        sa.ingest(src, tmp_path / "r.zarr")
    assert not (tmp_path / "pwned").exists()


def test_truncated_chunk_file_is_named(tmp_path):
    src = _torchtitan_run(tmp_path / "tt", trajectory([0, 10]))
    shard = src / "step-10" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(sa.CheckpointError, match=rf"{shard}: truncated: tensor '.*' needs bytes"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_chunks_must_cover_the_tensor(tmp_path):
    src = _fsdp_run(tmp_path / "fsdp", trajectory([0, 10]))
    meta = src / "checkpoint-10" / "pytorch_model_fsdp_0" / ".metadata"
    md = dcp_reader.load_metadata(meta)
    entry = md.state_dict_metadata["model.embed_out.weight"]
    entry.chunks[0].sizes = torch.Size([16, 8])  # half the rows
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(sa.CheckpointError, match=r"'model.embed_out.weight' of shape \(32, 8\) has chunks covering "
                                                 r"128 of its 256 elements"):
        sa.ingest(src, tmp_path / "r.zarr")


@pytest.mark.parametrize("layout", ["app state", "flat", "chained"])
def test_optimizer_state_at_any_depth_is_no_weight(layout, tmp_path):
    """PyTorch's recipe {"app": {"model", "optim"}}, a flat "optimizer.state.exp_avg.<name>" key and Megatron's
    "chained_0.optimizer...": Adam's moments (and its float step) were ingested as parameters (47 for 15)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 4), torch.randn(3)
    moments = {"exp_avg": torch.randn(3, 4), "exp_avg_sq": torch.rand(3, 4), "step": torch.tensor(3.0)}
    if layout == "app state":
        state = {"app": {"model": {"weight": weight, "bias": bias}, "optim": {"state": {"weight": moments}}}}
        names = {"app.model.weight", "app.model.bias"}
    elif layout == "flat":
        state = {"dec.weight": weight, "dec.bias": bias,
                 **{f"optimizer.state.{k}.dec.weight": v for k, v in moments.items()}}
        names = {"dec.weight", "dec.bias"}
    else:
        state = {"dec.weight": weight, "dec.bias": bias, "chained_0": {"optimizer": {"state": moments}}}
        names = {"dec.weight", "dec.bias"}
    _save(tmp_path / "step-10", state)
    reader = open_checkpoint(dcp_files(tmp_path / "step-10"), "step-10", KeyOptions())
    assert set(reader.tensors) == names


def test_an_int8_weight_is_told_as_the_other_readers_tell_it(tmp_path):
    """torch.distributed.checkpoint dropped non-floating tensors before the check that tells an int8 weight;
    a complex rotary table (torchtitan's freqs_cis) stays quiet."""
    for step in STEPS:
        _save(tmp_path / f"step-{step}", {"w": torch.full((3,), float(step)),
                                          "q.weight": torch.ones(2, 2, dtype=torch.int8),
                                          "freqs_cis": torch.ones(2, dtype=torch.complex64)})
    with pytest.warns(sa.UnreadWeightsWarning, match=r"tensor 'q\.weight' \(int8\) is not read"):
        sa.ingest(tmp_path, tmp_path / "r.zarr")


def _dcp_run(tmp_path: Path, make) -> Path:
    src = tmp_path / "run"
    for step in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single-process save
            dcp.save(make(torch.ones(3) * (step + 1)), checkpoint_id=str(src / f"step-{step}"))
    return src


def test_a_module_named_like_training_state_is_read_inside_the_model(tmp_path):
    """A weight under a module called scaler or rng, inside the model's container, was left out as if it were
    the training state's: the run lost it in silence."""
    src = _dcp_run(tmp_path, lambda t: {"model": {"enc.weight": t, "enc.scaler.weight": t * 2,
                                                  "head.rng.weight": t * 3},
                                        "optimizer": {"state.exp_avg": t}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnreadWeightsWarning)
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert sorted(run.tensors.tensor.values) == ["enc.scaler.weight", "enc.weight", "head.rng.weight"]


def test_a_module_named_like_training_state_is_read_in_flat_names(tmp_path):
    """Without a model container: a module named scaler that holds a weight is read; the optimizer's entries,
    their leaves named by the weights they belong to, are not."""
    src = _dcp_run(tmp_path, lambda t: {"enc.weight": t, "enc.scaler.weight": t * 2, "scaler.bias": t * 3,
                                        "optimizer": {"exp_avg": {"enc.weight": t}}, "optim.state.enc.weight": t})
    run = sa.ingest(src, tmp_path / "r.zarr")
    assert sorted(run.tensors.tensor.values) == ["enc.scaler.weight", "enc.weight", "scaler.bias"]


def test_flat_names_under_a_block_index_and_a_parameter_named_like_training_state_are_read(tmp_path):
    """torchtitan's flat layout: a module named scaler inside a list of blocks, and a parameter named rng,
    were left out as training state in silence (20 of 35 parameters ingested; Gram off by 50%)."""
    src = _dcp_run(tmp_path, lambda t: {"inp.weight": t, "blocks.0.scaler.0.weight": t * 2, "rng": t * 3,
                                        "optimizer": {"state.exp_avg": t}, "train_state": {"step": t[0]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnreadWeightsWarning)
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert sorted(run.tensors.tensor.values) == ["blocks.0.scaler.0.weight", "inp.weight", "rng"]


def test_weights_left_out_with_the_training_state_are_told(tmp_path):
    """A module under a name the training state uses, deeper than its weight (enc.scaler.proj.weight), is
    still taken for training state; it is told now and kept in the checkpoint's source. An optimizer's
    entries named by the weights they belong to are not told."""
    src = _dcp_run(tmp_path, lambda t: {"enc.weight": t, "enc.scaler.proj.weight": t * 2,
                                        "optimizer": {"exp_avg": {"enc.weight": t}}})
    with pytest.warns(sa.UnreadWeightsWarning, match=r"1 tensor under 'enc\.scaler' of \.metadata .*is not read"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert sorted(run.tensors.tensor.values) == ["enc.weight"]
    assert run.sources[0]["passed_over"] == [".metadata: enc.scaler"]


def test_a_tied_weight_saved_under_both_names_is_told(tmp_path):
    """torch.distributed.checkpoint saves a tied embedding and head under both names: the run counted the
    weight twice in every Gram, without a word. Told (and kept in the store's warnings); a layer norm pair
    equal at initialisation only, and a frozen pair, are not."""
    g = torch.Generator().manual_seed(0)
    emb, norms, frozen = torch.randn(10, 4, generator=g), torch.ones(2, 4), torch.randn(3, generator=g)
    src = tmp_path / "run"
    for step in range(3):
        emb = emb + 0.01 * torch.randn(10, 4, generator=g)
        moved = norms + (0 if step == 0 else 0.01 * torch.randn(2, 4, generator=g))
        state = {"emb.weight": emb, "head.weight": emb, "ln1.weight": moved[0], "ln2.weight": moved[1],
                 "f1": frozen, "f2": frozen}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": state}, checkpoint_id=str(src / f"step-{step}"))
    with pytest.warns(sa.TiedWeightsWarning) as caught:
        run = sa.ingest(src, tmp_path / "r.zarr")
    (message,) = [str(w.message) for w in caught if w.category is sa.TiedWeightsWarning]
    assert message.startswith("tensors 'emb.weight' and 'head.weight' have the same update at every step ingested")
    assert message.endswith("ingest again with exclude='head.weight'")
    assert message in run.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.TiedWeightsWarning)
        once = sa.ingest(src, tmp_path / "once.zarr", exclude=["head.weight"])
    assert int(once.tensors.size.sum()) == int(run.tensors.size.sum()) - 40
    shutil.rmtree(src / "step-2")  # one row: no tie told from it (a recorder writes one row at a time)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.TiedWeightsWarning)
        sa.ingest(src, tmp_path / "one_row.zarr")
