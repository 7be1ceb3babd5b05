"""Selections and groupings of tensors by name, on the naming schemes of real models: each tensor in the group
a researcher would put it in, every pattern accounted for, and the group's numbers those of its columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.groups import module_of, select_tensors


def _run(folder, shapes: dict[str, tuple[int, ...]], n: int = 6, seed: int = 0, **ingest) -> sa.Run:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for i in range(n):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file(state, str(folder / f"step_{10 * i}.safetensors"))
    return sa.ingest(folder, folder.parent / f"{folder.name}.zarr", **ingest)


def _columns(run: sa.Run, keep) -> np.ndarray:
    t = run.tensors
    cols = [np.arange(int(o), int(o + s)) for n, o, s in zip(t["tensor"].values, t["offset"].values, t["size"].values)
            if keep(str(n))]
    return run.deltas.values.astype(np.float64)[:, np.concatenate(cols)]


def _sigma(x: np.ndarray, window: int) -> np.ndarray:
    return np.array([np.linalg.svd(x[e - window + 1 : e + 1], compute_uv=False) for e in range(window - 1, len(x))])


T5 = {f"{stack}.block.{i}.layer.{j}.{m}.weight": (4, 4) for stack in ("encoder", "decoder") for i in (0, 1)
      for j, m in ((0, "SelfAttention.q"), (0, "SelfAttention.o"), (1, "DenseReluDense.wi"), (1, "DenseReluDense.wo"))}
T5["shared.weight"] = (5, 4)


def test_encoder_and_decoder_layers_are_groups_of_their_own(tmp_path):
    """T5's encoder.block.0 and decoder.block.0 were one group 'layer 0' (sigma_1 0.1237 of both pooled,
    against 0.0879 for the encoder's alone)."""
    run = _run(tmp_path / "t5", T5)
    ds = run.spectra(window=3, group_by="layer")
    assert list(ds["group"].values) == ["decoder layer 0", "decoder layer 1", "encoder layer 0", "encoder layer 1",
                                        "other"]
    for stack in ("encoder", "decoder"):
        for i in (0, 1):
            x = _columns(run, lambda n: n.startswith(f"{stack}.block.{i}."))
            got = ds["sigma"].sel(group=f"{stack} layer {i}").values
            np.testing.assert_allclose(got, _sigma(x, 3), rtol=0, atol=1e-9 * np.abs(got).max())
    single = run.spectra(window=3, group_by="layer", params="encoder.*")  # one stack selected: plain labels
    assert list(single["group"].values) == ["layer 0", "layer 1"]


@pytest.mark.parametrize("name, kind", [
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "mlp"),  # wo: an MLP's in T5, attention's in Llama
    ("layers.0.attention.wo.weight", "attention"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "attention"),
    ("decoder.block.0.layer.1.EncDecAttention.k.weight", "attention"),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "mlp"),
    ("encoder.layer.3.output.dense.weight", "mlp"),  # BERT's MLP down-projection
    ("encoder.layer.3.attention.output.dense.weight", "attention"),
    ("blocks.0.ffn.key.weight", "mlp"),  # RWKV's channel mixing
    ("blocks.0.att.key.weight", "attention"),
    ("backbone.layers.0.mixer.in_proj.weight", "other"),  # Mamba: no attention
    ("blocks.0.ln1.w", "norm"), ("ln_final.w", "norm"),  # TransformerLens
    ("blocks.0.attn.W_Q", "attention"), ("blocks.0.mlp.W_in", "mlp"), ("embed.W_E", "embedding"),
    ("shared.weight", "embedding"), ("patch_embed.proj.weight", "embedding"),
    ("mlp.experts.expert_3.wo.weight", "mlp"), ("blocks.3.attn.in_proj_weight", "attention"),
])
def test_module_kinds_of_more_architectures(name, kind):
    assert module_of(name) == kind


def test_t5_module_groups_hold_their_tensors(tmp_path):
    run = _run(tmp_path / "t5", T5)
    ds = run.spectra(window=3, group_by="module")
    assert {str(g): int(n) for g, n in zip(ds["group"].values, ds["n_params"].values)} == {
        "attention": 128, "mlp": 128, "embedding": 20}


def test_every_pattern_of_a_selection_must_match(tmp_path):
    """params=['*attn*', '*mpl*'] took the attention tensors alone; 'w[1]' selected w1 (a character class)."""
    names = ["layers.0.attn.weight", "layers.0.mlp.weight", "w1", "w[1]"]
    with pytest.raises(sa.SelectionError, match=r"no tensor matches '\*mpl\*', one of the patterns"):
        select_tensors(names, ["*attn*", "*mpl*"])
    assert select_tensors(names, "w[1]") == [3] and select_tensors(names, "w[12]") == [2]
    assert select_tensors(names, ["*attn*", "*mlp*"]) == [0, 1]


def test_every_include_and_exclude_pattern_must_match(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    for i in range(3):
        save_file({"attn.weight": torch.randn(3, 3), "mlp.weight": torch.randn(3, 3)}, str(src / f"step_{i}.safetensors"))
    for option in ({"include": ["attn.*", "lmhead.*"]}, {"exclude": ["mpl.*"]}):
        with pytest.raises(sa.SelectionError, match=r"pattern '(lmhead|mpl)\.\*' matches no tensor of "):
            sa.ingest(src, tmp_path / "r.zarr", **option)
        assert not (tmp_path / "r.zarr").exists()
    assert list(sa.ingest(src, tmp_path / "r.zarr", exclude=["mlp.*"]).tensors["tensor"].values) == ["attn.weight"]
    for i in range(3):  # an integer buffer (BatchNorm's num_batches_tracked) excluded: no tensor, no refusal
        save_file({"attn.weight": torch.randn(3, 3), "bn.num_batches_tracked": torch.tensor(i)},
                  str(src / f"step_{i}.safetensors"))
    sa.ingest(src, tmp_path / "b.zarr", exclude=["*num_batches_tracked"])


def test_grouping_by_layer_without_layer_indices_is_refused(tmp_path):
    """An nn.Sequential (0.weight, 2.weight): every tensor in 'other', the ungrouped spectrum, in silence."""
    run = _run(tmp_path / "seq", {"0.weight": (4, 3), "2.weight": (2, 4)})
    with pytest.raises(sa.SelectionError, match="no tensor name has a layer index"):
        run.spectra(window=3, group_by="layer")


def test_runs_side_by_side_keep_the_layers_in_order(tmp_path):
    a = _run(tmp_path / "a", {f"layers.{i}.w": (3,) for i in range(12)})
    b = _run(tmp_path / "b", {f"layers.{i}.w": (3,) for i in range(3)}, seed=1)
    ds = sa.open_runs([a.path, b.path]).spectra(window=3, group_by="layer")
    assert list(ds["group"].values) == [f"layer {i}" for i in range(12)]
    np.testing.assert_array_equal(ds["sigma"].isel(run=0).sel(group="layer 10").values,
                                  a.spectra(window=3, group_by="layer")["sigma"].sel(group="layer 10").values)


def test_a_pattern_that_is_a_tensors_name_picks_it_alone_wherever_patterns_are_taken(tmp_path):
    """'w[1]' is the tensor w[1] for --params; it was w1 for --include and --wq ('[1]' a character class) and
    both for weights' match. The weights and the query matrix now take the exact name first, as --params does;
    ingest, which selects while reading, refuses the pattern in one line instead of guessing."""
    from spectral_analyzer.weights import find_wq

    run = _run(tmp_path / "c", {"w[1]": (3, 3), "w1": (2, 2), "v": (2,)})
    assert [str(m) for m in run.weight_spectra("w[1]")["matrix"].values] == ["w[1]"]
    assert [str(m) for m in run.weight_spectra("w[12]")["matrix"].values] == ["w1"]
    assert find_wq(run.store, "w[1]") == "w[1]"
    for option in ({"include": ["w[1]"]}, {"exclude": ["w[1]"]}):
        message = (rf"the {next(iter(option))} pattern 'w\[1\]' is the name of a tensor and, as a glob, matches "
                   r"'w1' too; write \[\[\] for a literal \[ or name the tensors one by one \(.*step_0")
        with pytest.raises(sa.SelectionError, match=message):
            sa.ingest(tmp_path / "c", tmp_path / "s.zarr", **option)
        assert not (tmp_path / "s.zarr").exists()
    kept = sa.ingest(tmp_path / "c", tmp_path / "s.zarr", exclude=["w[[]1]"]).tensors["tensor"].values
    assert sorted(kept) == ["v", "w1"]
    model = torch.nn.Module()
    model.register_parameter("w[1]", torch.nn.Parameter(torch.ones(2)))
    model.register_parameter("w1", torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(sa.SelectionError, match=r"the include pattern 'w\[1\]' is the name of a tensor"):
        sa.Recorder(tmp_path / "rec.zarr", model, include=["w[1]"]).record(0)


def test_layer_indices_are_the_digits_as_written():
    """layers.01.* and layers.1.* were one group, 'layer 1' (the index went through int())."""
    from spectral_analyzer.groups import group_tensors, layer_of

    names = ["layers.01.w", "layers.1.w", "layers.2.w"]
    assert group_tensors(names, [0, 1, 2], "layer") == {"layer 01": [0], "layer 1": [1], "layer 2": [2]}
    assert [layer_of(n) for n in names] == ["layer 01", "layer 1", "layer 2"]


def test_every_pattern_of_a_weight_or_layer_selection_must_match():
    """weights --match 'attn.*' --match 'mpl.*' decomposed the attention matrices alone, and attention
    --layer the layers of the first pattern alone: a typo in a list narrowed the selection in silence."""
    from spectral_analyzer.store.layout import TensorEntry
    from spectral_analyzer.weights import select_weights
    from spectral_analyzer.weights.layouts import find_attention_layers

    manifest = [TensorEntry(n, 16 * i, 16, (4, 4), "float32") for i, n in enumerate(["attn.weight", "mlp.weight"])]
    with pytest.raises(sa.SelectionError, match=r"no 2-D weight matches 'mpl\.\*', one of the patterns"):
        select_weights(manifest, ["attn.*", "mpl.*"])
    assert [t.name for t, _ in select_weights(manifest, ["attn.*", "mlp.*"])] == ["attn.weight", "mlp.weight"]
    shapes = {f"l{i}.attn.in_proj_weight": (24, 8) for i in range(2)} | {f"l{i}.attn.out_proj.weight": (8, 8)
                                                                       for i in range(2)}
    with pytest.raises(sa.SelectionError, match=r"s\.zarr: no attention layer matches 'l2\*', one of the patterns"):
        find_attention_layers(shapes, heads=2, match=["l0*", "l2*"], origin="s.zarr")
    assert [a.name for a in find_attention_layers(shapes, heads=2, match=["l0*", "l1*"])] == ["l0.attn", "l1.attn"]
