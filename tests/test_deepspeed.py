"""DeepSpeed folders (written here with torch.save in DeepSpeed's layout; DeepSpeed is not installed)."""

from __future__ import annotations

import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_run, snapshot, trajectory, write_safetensors_run

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.ingest.deepspeed import deepspeed_files
from spectral_analyzer.ingest.readers import KeyOptions, open_checkpoint

STEPS = [100, 200, 300]


def _model_states(state: dict, step: int, zero3: bool = False) -> dict:
    """What DeepSpeed's engine saves in *_model_states.pt: the module, its shapes and its bookkeeping."""
    module = {k: torch.empty(0, dtype=v.dtype) if zero3 else v for k, v in state.items()}
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in state.items())],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": {"last_batch_iteration": step},
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": step * 8,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 3 if zero3 else 2}, "bf16": {"enabled": True}},
        "ds_version": "0.16.4",
    }


def _save_dir(root: Path, states: dict[int, dict], zero3_at: tuple[int, ...] = ()) -> Path:
    """A DeepSpeed save_dir: global_step<N>/ per checkpoint, latest, zero_to_fp32.py."""
    root.mkdir(parents=True, exist_ok=True)
    for step, state in states.items():
        tag = root / f"global_step{step}"
        tag.mkdir()
        zero3 = step in zero3_at
        for rank in (0, 1):
            optim = {"optimizer_state_dict": {"fp32_flat_groups": [torch.ones(4)]}, "ds_version": "0.16.4"}
            torch.save(optim, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            if zero3:
                torch.save(_model_states(state, step, zero3=True), tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        if not zero3:
            torch.save(_model_states(state, step), tag / "mp_rank_00_model_states.pt")
        (root / "latest").write_text(f"global_step{step}")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    return root


def test_deepspeed_bit_identical_to_safetensors(tmp_path):
    states = trajectory(STEPS, dtype=torch.bfloat16)
    run = sa.ingest(_save_dir(tmp_path / "ds", states), tmp_path / "d.zarr")
    assert_same_run(run, sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr"))
    assert [Path(s["files"][0]["path"]).name for s in run.sources] == ["mp_rank_00_model_states.pt"] * 3


def test_hf_trainer_checkpoints_under_deepspeed(tmp_path):
    """checkpoint-<N>/ holding global_step<N>/ and latest, no model file beside them."""
    states = trajectory(STEPS)
    for step, state in states.items():
        _save_dir(tmp_path / "out" / f"checkpoint-{step}", {step: state})
    run = sa.ingest(tmp_path / "out", tmp_path / "d.zarr")
    assert_same_run(run, sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr"))


def test_step_from_global_steps(tmp_path):
    src = _save_dir(tmp_path / "ds", trajectory([7]))
    files = deepspeed_files(src / "global_step7")
    assert files == (src / "global_step7" / "mp_rank_00_model_states.pt",) == deepspeed_files(src)  # by latest
    assert open_checkpoint(files, "ds", KeyOptions()).step_hint == 7


def test_zero3_refused_with_the_command_store_kept(tmp_path):
    states = trajectory([*STEPS, 400])
    src = _save_dir(tmp_path / "ds", {s: states[s] for s in STEPS})
    store = tmp_path / "r.zarr"
    sa.ingest(src, store)
    before = snapshot(store)
    _save_dir(src, {400: states[400]}, zero3_at=(400,))
    result = CliRunner().invoke(main, ["ingest", str(src), "-o", str(store), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {src / 'global_step400' / 'zero_pp_rank_0_mp_rank_00_model_states.pt'}: a DeepSpeed ZeRO-3 "
        "checkpoint, its parameters partitioned across ranks; consolidate it first with: "
        f"python {src / 'zero_to_fp32.py'} {src} {tmp_path / 'ds-fp32' / 'global_step400'} -t global_step400 "
        "(then ingest ds-fp32/)"
    ]
    assert snapshot(store) == before


def test_the_consolidation_command_quotes_a_folder_with_a_space(tmp_path):
    """Pasted into a shell, the command gives zero_to_fp32.py its three arguments, not five."""
    states = trajectory(STEPS)
    src = _save_dir(tmp_path / "my run", {STEPS[0]: states[STEPS[0]]}, zero3_at=(STEPS[0],))
    with pytest.raises(sa.CheckpointError) as refused:
        sa.ingest(src, tmp_path / "r.zarr")
    command = str(refused.value).split("consolidate it first with: ", 1)[1].rsplit(" (then ingest", 1)[0]
    assert shlex.split(command) == ["python", str(src / "zero_to_fp32.py"), str(src),
                                    str(tmp_path / "my run-fp32" / f"global_step{STEPS[0]}"), "-t",
                                    f"global_step{STEPS[0]}"]


def test_placeholder_parameters_refused(tmp_path):
    states = trajectory(STEPS)
    src = _save_dir(tmp_path / "ds", states)
    torch.save(_model_states(states[200], 200, zero3=True), src / "global_step200" / "mp_rank_00_model_states.pt")
    with pytest.raises(sa.CheckpointError, match=r"global_step200/mp_rank_00_model_states.pt: a DeepSpeed ZeRO-3 "
                                                 r"checkpoint.*zero_to_fp32.py"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_model_parallel_refused(tmp_path):
    states = trajectory(STEPS)
    src = _save_dir(tmp_path / "ds", states)
    torch.save(_model_states(states[100], 100), src / "global_step100" / "mp_rank_01_model_states.pt")
    with pytest.raises(sa.CheckpointError, match=r"mp_rank_01_model_states.pt: a model-parallel DeepSpeed checkpoint"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_mixture_of_experts_saved_apart_refused(tmp_path):
    """DeepSpeed MoE saves each expert in layer_<L>_expert_<E>_mp_rank_00_model_states.pt and leaves it out of
    mp_rank_00's module: the experts were dropped from the run in silence."""
    states = trajectory(STEPS)
    src = _save_dir(tmp_path / "ds", states)
    torch.save({"moe.experts.0.w": torch.randn(3, 3)}, src / "global_step100" / "layer_0_expert_0_mp_rank_00_model_states.pt")
    with pytest.raises(sa.CheckpointError, match=r"layer_0_expert_0_mp_rank_00_model_states.pt: a DeepSpeed "
                                                 "mixture-of-experts checkpoint"):
        sa.ingest(src, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
