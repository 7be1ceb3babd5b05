"""Discovery never drops, reorders or invents a checkpoint in silence: a folder or
file it cannot make sense of is a one-line error naming it, and the store is
left as it was; layouts it knows (the Trainer's pickles, its final model, log
folders) are still read as before."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import snapshot
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest.discover import discover, order_by_step, step_from_name

STEPS = [100, 200, 300]


def _state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"a.weight": torch.randn(8, 8, generator=g), "b.weight": torch.randn(16, generator=g)}


def _trainer_run(root: Path) -> Path:
    """checkpoint-<step>/ folders as the HF Trainer writes them: the model and its optimizer."""
    for step in STEPS:
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(_state(step), str(d / "model.safetensors"))
        torch.save({"state": {}}, d / "optimizer.pt")
    return root


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _steps(src: Path) -> list[int]:
    return [c.step for c in order_by_step(discover(src))]


# -- a checkpoint folder without usable weights --------------------------------------------------------


def _only_optimizer(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _unindexed_shards(d: Path) -> None:
    state = _state(200)
    (d / "model.safetensors").unlink()
    torch.save({"a.weight": state["a.weight"]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": state["b.weight"]}, d / "pytorch_model-00002-of-00002.bin")


def _two_fsdp_models(d: Path) -> None:
    (d / "model.safetensors").unlink()
    with warnings.catch_warnings():  # torch: "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        for i in (0, 1):
            dcp.save({"model": _state(200 + i)}, checkpoint_id=d / f"pytorch_model_fsdp_{i}", no_dist=True)


@pytest.mark.parametrize(
    "damage, pattern",
    [
        (_only_optimizer, r"checkpoint-200: not a checkpoint: no model weights \(it holds optimizer.pt;"),
        (_unindexed_shards, r"checkpoint-200: not a checkpoint: 2 weight files \(pytorch_model-00001-of-00002.bin"),
        (_two_fsdp_models, r"checkpoint-200: not a checkpoint: 2 torch.distributed.checkpoint models"),
    ],
)
def test_stepped_folder_without_one_model_is_refused_not_skipped(tmp_path, damage, pattern):
    src = _trainer_run(tmp_path / "run")
    damage(src / "checkpoint-200")
    with pytest.raises(sa.CheckpointError, match=pattern) as exc:
        discover(src)
    assert str(src / "checkpoint-200") in _one_line(exc)


def test_shard_index_naming_no_files_is_refused(tmp_path):
    src = _trainer_run(tmp_path / "run")
    d = src / "checkpoint-200"
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(sa.CheckpointError, match="names no shard files") as exc:
        discover(src)
    assert str(d / "model.safetensors.index.json") in _one_line(exc)


@pytest.mark.parametrize("layout", ["folder", "top-level file"])
def test_weight_file_linking_to_nothing_is_listed_then_refused_with_its_name(tmp_path, layout):
    src = tmp_path / "run"
    if layout == "folder":
        _trainer_run(src)
        link = src / "checkpoint-200" / "model.safetensors"
    else:
        src.mkdir()
        for step in STEPS:
            save_file(_state(step), str(src / f"step_{step}.safetensors"))
        link = src / "step_200.safetensors"
    link.unlink()
    link.symlink_to(tmp_path / "gone" / "blob")
    found = order_by_step(discover(src))
    assert [c.step for c in found] == STEPS and found[1].files == (link,)
    with pytest.raises(sa.CheckpointError, match="cannot read") as exc:
        sa.ingest(src, tmp_path / "r.zarr")
    assert str(link) in _one_line(exc)
    assert not (tmp_path / "r.zarr").exists()


def test_checkpoint_without_weights_is_not_appended_around(tmp_path, hf_copy):
    store = tmp_path / "run.zarr"
    sa.ingest(hf_copy, store)
    before = snapshot(store)
    for step in (35, 40):
        shutil.copytree(hf_copy / "checkpoint-30", hf_copy / f"checkpoint-{step}")
    (hf_copy / "checkpoint-35" / "model.safetensors").unlink()
    with pytest.raises(sa.CheckpointError, match="checkpoint-35: not a checkpoint"):
        sa.ingest(hf_copy, store)
    assert snapshot(store) == before


def test_folders_that_are_not_checkpoints_are_still_passed_over(tmp_path):
    src = _trainer_run(tmp_path / "run")
    (src / "runs" / "Jan01_00-00-00_host").mkdir(parents=True)  # the Trainer's TensorBoard logs
    (src / "runs" / "Jan01_00-00-00_host" / "events.out.tfevents.1.host.2.0").write_bytes(b"")
    (src / "eval_2").mkdir()
    (src / "eval_2" / "results.json").write_text("{}")
    (src / "wandb_1").mkdir()
    assert _steps(src) == STEPS


# -- steps in names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ckpt_1k", "step2B", "checkpoint-3M", "model_7b"])
def test_step_followed_by_a_letter_is_refused(name):
    with pytest.raises(sa.StepError, match=f"{name}: .* is a number followed by letters"):
        step_from_name(name)


@pytest.mark.parametrize(
    "name, step",
    [("stage1-step1000-tokens4B", 1000), ("model-00002-of-00002", None), ("step_100-00001-of-00002", 100)],
)
def test_step_is_never_a_token_count_or_a_shard_number(name, step):
    assert step_from_name(name) == step


def test_abbreviated_steps_are_refused_not_misordered(tmp_path):
    for name in ("ckpt_500", "ckpt_1k", "ckpt_2k"):
        save_file(_state(0), str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(sa.StepError) as exc:
        discover(tmp_path)
    assert str(tmp_path / "ckpt_1k.safetensors") in _one_line(exc) and "ckpt_1000" in str(exc.value)


# -- the Trainer's final model, a stale index --------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2])
def test_final_sharded_model_beside_checkpoint_folders_is_left_out(tmp_path, n_shards):
    src = _trainer_run(tmp_path / "run")
    state, weight_map = _state(300), {}
    for i, name in enumerate(["a.weight", "b.weight"]):
        shard = f"model-{min(i, n_shards - 1) + 1:05d}-of-{n_shards:05d}.safetensors"
        weight_map[name] = shard
    for shard in set(weight_map.values()):
        save_file({k: state[k] for k, s in weight_map.items() if s == shard}, str(src / shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    found = order_by_step(discover(src))
    assert [c.step for c in found] == STEPS
    assert [Path(c.label).name for c in found] == [f"checkpoint-{s}" for s in STEPS]


def test_top_level_shards_alone_have_no_step(tmp_path):
    for i in (1, 2):
        save_file(_state(i), str(tmp_path / f"model-0000{i}-of-00002.safetensors"))
    with pytest.raises(sa.StepError, match="model-00001-of-00002.safetensors: no step in its name"):
        order_by_step(discover(tmp_path))


def test_stale_bin_index_beside_safetensors_is_not_read(tmp_path):
    src = _trainer_run(tmp_path / "run")
    d = src / "checkpoint-200"
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin"}})
    )
    found = order_by_step(discover(src))
    assert found[1].files == (d / "model.safetensors",)


def test_the_single_file_is_read_before_an_index_of_shards_as_from_pretrained_does(tmp_path):
    """model.safetensors beside model.safetensors.index.json and its shards: the shards were read, where
    transformers' from_pretrained loads the single file."""
    from spectral_analyzer.ingest.discover import checkpoint_files

    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    save_file({"w": torch.full((2,), 2.0)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    assert checkpoint_files(folder) == (folder / "model.safetensors",)
    (folder / "model.safetensors").unlink()
    assert checkpoint_files(folder) == (folder / "model-00001-of-00001.safetensors",)


def test_weight_files_beside_the_model_are_told_and_kept_in_provenance(tmp_path):
    """A LoRA adapter beside the base model: only model.safetensors was read, and nothing said the adapter,
    the weights that trained, was left out. Now one warning, and each source's provenance lists it; the same
    model in the other format (pytorch_model.bin) is not counted."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g)}
    for step in (10, 20, 30):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({"w": base["w"] + step * 1e-2}, str(d / "model.safetensors"))
        save_file({"lora_A": torch.randn(2, 4, generator=g)}, str(d / "adapter_model.safetensors"))
        torch.save({"w": base["w"]}, d / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = sa.ingest(tmp_path / "run", tmp_path / "r.zarr")
    told = [str(w.message) for w in caught if issubclass(w.category, sa.UnreadWeightsWarning)]
    assert told == [f"{tmp_path}/run/checkpoint-10: adapter_model.safetensors is not read, and 2 more beside the "
                    "other checkpoints: the checkpoint is its model's weights (model.safetensors); an adapter, EMA "
                    "copy or second model beside them is not part of the run"]
    assert [s.get("passed_over") for s in run.sources] == [["adapter_model.safetensors"]] * 3


@pytest.mark.parametrize("names", [("ema.safetensors", "weights.safetensors"),
                                   ("model-00001-of-00001.safetensors", "model-extra.safetensors")])
def test_weight_files_of_no_one_model_are_refused(tmp_path, names):
    """weights.safetensors beside ema.safetensors (no index): both were read as one model, the EMA's tensors
    mixed into the parameter vector."""
    for step in (10, 20):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for i, name in enumerate(names):
            save_file({f"t{i}": torch.full((3,), float(step))}, str(d / name))
    with pytest.raises(sa.CheckpointError, match=rf"checkpoint-10: 2 weight files \({re.escape(', '.join(names))}\) "
                                                 r"and no model.safetensors.index.json naming them shards of one "
                                                 r"model"):
        sa.ingest(tmp_path / "run", tmp_path / "r.zarr")


def test_hidden_files_are_no_checkpoints(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 10, 20):
        save_file({"w": torch.full((3,), float(step))}, str(src / f"step_{step}.safetensors"))
    save_file({"w": torch.full((3,), 15.0)}, str(src / ".step_15.safetensors"))  # a copy being written
    assert list(sa.ingest(src, tmp_path / "r.zarr").checkpoint_steps) == [0, 10, 20]


def test_weights_of_no_float_dtype_are_told(tmp_path):
    """An int8 quantised matrix beside its float scale, a complex parameter: left out in silence, the
    'trajectory' of the scales alone. Told now, once; integer buffers and boolean masks still pass quietly."""
    src, pickles = tmp_path / "st", tmp_path / "pk"
    src.mkdir()
    pickles.mkdir()
    for step in (0, 10, 20):
        state = {"q.weight": torch.full((4, 4), step, dtype=torch.int8), "q.weight_scale": torch.full((4,), 1.0 + step),
                 "pos_ids": torch.arange(4), "mask": torch.ones(4, dtype=torch.bool)}
        save_file(state, str(src / f"step_{step}.safetensors"))
        torch.save({**state, "rot.weight": torch.ones(2, dtype=torch.complex64)}, pickles / f"step_{step}.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sa.ingest(src, tmp_path / "r.zarr")
    told = [str(w.message) for w in caught if issubclass(w.category, sa.UnreadWeightsWarning)]
    assert told == [f"{src}/step_0.safetensors: tensor 'q.weight' (int8) is not read: only floating-point tensors "
                    "are; quantised weights and complex parameters are not part of the run (dequantise them, or "
                    "leave them out with exclude= to silence this)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnreadWeightsWarning)
        sa.ingest(src, tmp_path / "s.zarr", exclude=["q.weight"])
    with pytest.warns(sa.UnreadWeightsWarning, match=r"step_0\.pt: tensor 'q\.weight' \(int8\) and 1 more are not"):
        sa.ingest(pickles, tmp_path / "p.zarr")


def test_a_save_in_progress_is_told_and_not_read(tmp_path):
    src = tmp_path / "run"
    for step in (10, 20, 30):
        folder = src / (f"checkpoint-{step}" if step < 30 else f"tmp-checkpoint-{step}")
        folder.mkdir(parents=True)
        save_file({"w": torch.full((3,), float(step))}, str(folder / "model.safetensors"))
    with pytest.warns(sa.UnreadWeightsWarning, match=r"tmp-checkpoint-30: a save in progress \(or cut short\), not "
                                                      "read"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [10, 20]


def test_weights_that_hold_no_values_are_told(tmp_path):
    """save_pretrained under DeepSpeed ZeRO-3 without gathering: the matrices saved as shape (0,) placeholders
    beside the small parameters in full, ingested without a word. A device tracker (an empty buffer) is quiet."""
    src = tmp_path / "run"
    for step in (10, 20, 30):
        folder = src / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"q_proj.weight": torch.empty(0), "fc1.weight": torch.empty(0), "norm.weight": torch.full((4,), step
                   * 1.0), "_device_tracker": torch.empty(0)}, str(folder / "model.safetensors"))
    with pytest.warns(sa.UnreadWeightsWarning, match=r"checkpoint-10: tensor 'fc1\.weight' \(no values, shape \(0,\)\) "
                                                      r"and 1 more hold no values: placeholders of weights"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_a_weight_of_a_zero_sized_dimension_is_no_placeholder(tmp_path):
    """ZeRO-3's placeholders are shape (0,); a matrix with an empty dimension (a layer of no outputs, an empty
    prompt table) was told to be one, with advice to gather a model that was whole."""
    src = tmp_path / "run"
    for step in (10, 20, 30):
        folder = src / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"prompt.weight": torch.empty(0, 4), "norm.weight": torch.full((4,), step * 1.0)},
                  str(folder / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert run.delta("prompt.weight").shape == (2, 0, 4)


@pytest.mark.parametrize("layout, where", [
    ("ema", "'ema_state_dict'"),  # the EMA copy saved beside the state dict
    ("nested", "'nested'"),  # top-level tensors with a second model nested among them
    ("shadow", "'shadow_params'"),  # an EMA's list of shadow parameters
    ("inner", "'state_dict.encoder'"),  # a module's weights nested inside the state dict read
])
def test_weights_in_a_pickle_beside_its_state_dict_are_told(tmp_path, layout, where):
    """A pickle holding a second set of weights beside the state dict read (an EMA copy, a teacher, a nested
    module) was ingested without a word about them; the optimizer's state stays quiet."""
    src = tmp_path / "run"
    src.mkdir()
    for step in (10, 20, 30):
        state = _state(step)
        other = {k: v * 0.5 for k, v in state.items()}
        optimizer = {"state": {0: {"exp_avg": torch.randn(8, 8), "step": torch.tensor(3.0)}},
                     "param_groups": [{"params": [0], "lr": 0.1}]}
        obj = {"ema": {"state_dict": state, "ema_state_dict": other, "optimizer": optimizer},
               "nested": {**state, "nested": other},
               "shadow": {"model": state, "optimizer_states": [optimizer], "shadow_params": list(other.values())},
               "inner": {"state_dict": {**state, "encoder": other}},
               }[layout]
        torch.save(obj, src / f"step_{step}.pt")
    with pytest.warns(sa.UnreadWeightsWarning) as caught:
        run = sa.ingest(src, tmp_path / "r.zarr")
    told = [str(w.message) for w in caught if issubclass(w.category, sa.UnreadWeightsWarning)]
    assert told == [f"{src}/step_10.pt: 2 tensors under {where} (and 2 more such) are not read: the run is the "
                    "weights of the file's state dict; an EMA copy, teacher, second model or training state saved "
                    "beside them is not part of it (save the one to analyse as the state dict)"]
    assert [s["passed_over"] for s in run.sources] == [[f"step_{step}.pt: {where[1:-1]}"] for step in (10, 20, 30)]
    theta = [torch.cat([v.flatten() for v in _state(step).values()]).double() for step in (10, 20, 30)]
    band = run.band(max_lag=1).sum("tensor").values
    assert band[1, 0] == pytest.approx(float((theta[2] - theta[1]).square().sum()), rel=1e-6)


def test_compressed_checkpoints_are_told(tmp_path):
    """Checkpoints archived to save space (step_300.pt.gz, checkpoint-400.tar.zst) were passed over in silence:
    the run lost them, and its deltas spanned the gaps. Told when others are read; named when none is."""
    src = tmp_path / "run"
    src.mkdir()
    for step in (100, 200):
        torch.save(_state(step), src / f"step_{step}.pt")
    (src / "step_300.pt.gz").write_bytes(b"\x1f\x8b")
    (src / "checkpoint-400.tar.zst").write_bytes(b"(")
    (src / "logs.tar").write_bytes(b"")  # no number: no checkpoint
    with pytest.warns(sa.UnreadWeightsWarning, match=re.escape(
            f"{src}/checkpoint-400.tar.zst and 1 more: compressed or archived checkpoints, not read; unpack them to make "
            "them part of the run")):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [100, 200]
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "model_step_5.safetensors.zst").write_bytes(b"")
    with pytest.raises(sa.NoCheckpointsError, match=r"checkpoint-<step>/ folders\); model_step_5\.safetensors\.zst: "
                                                    "compressed or archived checkpoint, not read"):
        sa.ingest(packed, tmp_path / "p.zarr")


def test_a_model_in_a_subfolder_of_a_checkpoint_is_told(tmp_path):
    """checkpoint-N/ema/model.safetensors beside checkpoint-N/model.safetensors went unmentioned; DeepSpeed's
    global_step folder beside the model (the same weights as the ranks' state) stays quiet."""
    src = tmp_path / "run"
    for step in (10, 20):
        d = src / f"checkpoint-{step}"
        (d / "ema").mkdir(parents=True)
        (d / f"global_step{step}").mkdir()
        save_file(_state(step), str(d / "model.safetensors"))
        save_file(_state(step + 1), str(d / "ema" / "model.safetensors"))
        torch.save({"module": _state(step)}, d / f"global_step{step}" / "mp_rank_00_model_states.pt")
        (d / "original").mkdir()  # the model in Meta's format, as a hub snapshot holds it
        torch.save(_state(step), d / "original" / "consolidated.00.pth")
    with pytest.warns(sa.UnreadWeightsWarning, match=r"checkpoint-10: ema/model\.safetensors is not read, and 1 "
                                                      "more beside the other checkpoints"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert [s["passed_over"] for s in run.sources] == [["ema/model.safetensors"]] * 2


def test_a_weight_suffix_in_capitals_is_refused(tmp_path):
    """step_2.PT among step_N.pt files was passed over: the run lost step 2, and the delta 1 -> 3 read as one."""
    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 1, 2, 3):
        torch.save(_state(step), src / f"step_{step}.{'PT' if step == 2 else 'pt'}")
    with pytest.raises(sa.CheckpointError, match=r"step_2\.PT: a weight file's suffix in capitals; rename it "
                                                 r"step_2\.pt to read it"):
        sa.ingest(src, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_the_same_model_under_two_keys_of_a_pickle_is_quiet(tmp_path):
    """One model saved under two keys (the same tensors), and a Lightning checkpoint with its optimizer and
    loops' state: nothing beside the state dict to tell."""
    src = tmp_path / "run"
    src.mkdir()
    for step in (10, 20):
        state = _state(step)
        torch.save({"model": state, "model_ema_off": dict(state), "epoch": 1}, src / f"step_{step}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnreadWeightsWarning)
        sa.ingest(src, tmp_path / "r.zarr")


def test_what_is_no_second_model_and_no_weight_stays_quiet(tmp_path):
    """No warning for the same weights in another precision or format (model.fp16.safetensors, Mistral's
    consolidated.safetensors, torchtune's adapter_model.pt beside adapter_model.safetensors), Accelerate's
    sampler and data-loader state, GPT-2's uint8 causal mask or a complex rotary table."""
    src = tmp_path / "run"
    for step in (10, 20):
        d = src / f"checkpoint-{step}"
        d.mkdir(parents=True)
        state = {"w": torch.full((3,), float(step)), "h.0.attn.bias": torch.ones(2, 2, dtype=torch.uint8)}
        save_file(state, str(d / "model.safetensors"))
        save_file({"w": torch.full((3,), float(step)).half()}, str(d / "model.fp16.safetensors"))
        save_file(state, str(d / "consolidated.safetensors"))
        torch.save({"epoch": 1}, d / "sampler.bin")
        torch.save({"state": 1}, d / "dl_state_dict.bin")
        a = src / f"epoch_{step}"
        a.mkdir()
        save_file({"lora_a.weight": torch.full((2,), float(step))}, str(a / "adapter_model.safetensors"))
        torch.save({"lora_a.weight": torch.full((2,), float(step)),
                    "freqs_cis": torch.ones(2, dtype=torch.complex64)}, a / "adapter_model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.UnreadWeightsWarning)
        for name in ("checkpoint", "epoch"):
            run_dir = tmp_path / name
            run_dir.mkdir()
            for d in src.glob(f"{name}*"):
                shutil.copytree(d, run_dir / d.name)
            sa.ingest(run_dir, tmp_path / f"{name}.zarr")
        pickles = tmp_path / "pk"
        pickles.mkdir()
        for step in (0, 10):
            torch.save({"w": torch.full((3,), float(step)), "freqs_cis": torch.ones(2, dtype=torch.complex64),
                        "h.0.attn.bias": torch.ones(2, 2, dtype=torch.uint8)}, pickles / f"step_{step}.pt")
        sa.ingest(pickles, tmp_path / "pk.zarr")
