"""Attention layouts the shapes alone cannot tell apart: split as the model splits them, kept whole, or refused
in one line; never split another way under the same names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.weights.kernel import singular_values
from spectral_analyzer.weights.layouts import find_attention_layers, interleaved_packing


def _run(tmp_path, tensors: dict[str, np.ndarray], config: dict, weights=None, n: int = 2):
    """A run of *n* checkpoints of *tensors* moved by noise, with *config* beside them; (run, the last
    checkpoint's values in float64)."""
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text(json.dumps(config))
    for i in range(n):
        state = {k: torch.from_numpy((v + 0.05 * i * rng.standard_normal(v.shape)).astype(np.float32))
                 for k, v in tensors.items()}
        save_file(state, str(src / f"step_{i}.safetensors"))
    last = {k: t.double().numpy() for k, t in state.items()}
    return sa.ingest(src, tmp_path / "r.zarr", weights=weights), last


def _sigma(ws, matrix: str) -> np.ndarray:
    got = ws["sigma"].sel(matrix=matrix).values[-1]
    return got[np.isfinite(got)]


def _assert_svd(got: np.ndarray, block: np.ndarray) -> None:
    want = np.linalg.svd(block, compute_uv=False)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want[0])


@pytest.mark.parametrize("model", ["falcon", "chatglm2"])
def test_a_query_key_value_of_grouped_heads_stays_whole(model, tmp_path):
    """Falcon-40B packs [kv group, (its q heads, k, v), d] and ChatGLM2 [q | k | v] with 2 key/value groups of
    8 query heads: rows 72 of width 48, which 3 x 8 heads divide. Split as GPT-NeoX's [head, (q, k, v), d], W_Q
    had 24 rows of the wrong heads (sigma_1 33.6 against 45.9); the tensor is now analysed whole."""
    rng = np.random.default_rng(1)
    E, H, G, d = 48, 8, 2, 6
    p = "transformer.h.0.self_attention"
    qkv = rng.standard_normal(((H + 2 * G) * d, E))
    qkv[: 4 * d] *= 4
    tensors = {f"{p}.query_key_value.weight": qkv, f"{p}.dense.weight": rng.standard_normal((E, E))}
    config = ({"model_type": "falcon", "num_attention_heads": H, "num_kv_heads": G,
               "new_decoder_architecture": True, "hidden_size": E} if model == "falcon" else
              {"model_type": "chatglm", "num_attention_heads": H, "multi_query_attention": True,
               "multi_query_group_num": G, "kv_channels": d, "hidden_size": E})
    assert interleaved_packing({k: v.shape for k, v in tensors.items()}, config) == {}
    run, last = _run(tmp_path, tensors, config)
    ws = run.weight_spectra()
    assert list(ws["matrix"].values) == [f"{p}.dense.weight", f"{p}.query_key_value.weight"]
    _assert_svd(_sigma(ws, f"{p}.query_key_value.weight"), last[f"{p}.query_key_value.weight"])
    with pytest.raises(sa.SelectionError, match=r"no 2-D weight matches \['\*query_key_value.weight\[q\]'\]"):
        run.weight_spectra("*query_key_value.weight[q]")
    with pytest.raises(sa.SelectionError):
        run.attention_spectra()


def test_chatglm_query_key_value_is_interleaved_per_head_unless_multi_query_attention():
    """ChatGLM2 and 3 with multi_query_attention pack [q | k | v] (3E, E) one after another; with it false
    their SelfAttention views the projection as (heads, 3 d_head) and splits the last axis in three, as
    ChatGLM-6B (no such flag) and GPT-NeoX do. A false flag was read as [q | k | v]: every head's circuits
    were of other rows than the model's."""
    shapes = {"l.self_attention.query_key_value.weight": (48, 16), "l.self_attention.dense.weight": (16, 16)}
    mqa = {"model_type": "chatglm", "num_attention_heads": 4, "multi_query_attention": True}
    (layer,) = find_attention_layers(shapes, config=mqa)
    assert layer.layout == "linear_packed" and interleaved_packing(shapes, mqa) == {}
    for config in ({"model_type": "chatglm", "num_attention_heads": 4, "multi_query_attention": False},
                   {"model_type": "chatglm", "num_attention_heads": 4}):
        (layer,) = find_attention_layers(shapes, config=config)
        assert layer.layout == "neox_packed"
        assert interleaved_packing(shapes, config) == {"l.self_attention.query_key_value.weight": 4}


def test_chatglm2_query_key_value_ingested_is_read_as_q_then_k_then_v(tmp_path):
    """The store kept the config's integers and model_type only: multi_query_attention never reached it, and
    an ingested ChatGLM2 query_key_value was split per head as GPT-NeoX's (W_Q sigma_1 9.857 against 10.133)."""
    rng = np.random.default_rng(3)
    E, H = 32, 4
    p = "transformer.encoder.layers.0.self_attention"
    tensors = {f"{p}.query_key_value.weight": rng.standard_normal((3 * E, E)),
               f"{p}.dense.weight": rng.standard_normal((E, E))}
    config = {"model_type": "chatglm", "num_attention_heads": H, "multi_query_attention": True,
              "multi_query_group_num": H, "kv_channels": E // H, "hidden_size": E}
    run, last = _run(tmp_path, tensors, config)
    assert run.provenance["model_config"]["multi_query_attention"] is True
    with pytest.raises(sa.SelectionError):  # not split per head: kept whole in the weight spectra
        run.weight_spectra(f"{p}.query_key_value.weight[q]")
    qkv = last[f"{p}.query_key_value.weight"]
    got = run.attention_spectra()["qk_sigma"].values[-1, 0]
    d = E // H
    for h in range(H):  # q then k then v, each [head, d_head] rows
        qk = qkv[h * d : (h + 1) * d].T @ qkv[E + h * d : E + (h + 1) * d]
        want = np.linalg.svd(qk, compute_uv=False)[:d]
        np.testing.assert_allclose(got[h, :d], want, rtol=0, atol=1e-6 * want[0])


def test_chatglm2_without_multi_query_attention_ingested_is_split_per_head(tmp_path):
    """ChatGLM2's config class defaults multi_query_attention to false, and then the projection is
    (heads, [q, k, v], d_head), as GPT-NeoX's: head 0's QK sigma was [23.66, 16.39, ...] (rows [q | k | v])
    where the model's head 0 gives [19.68, 13.95, ...]."""
    rng = np.random.default_rng(4)
    E, H = 16, 4
    d = E // H
    p = "transformer.encoder.layers.0.self_attention"
    tensors = {f"{p}.query_key_value.weight": rng.standard_normal((3 * E, E)),
               f"{p}.dense.weight": rng.standard_normal((E, E))}
    config = {"model_type": "chatglm", "num_attention_heads": H, "multi_query_attention": False,
              "multi_query_group_num": 2, "kv_channels": d, "hidden_size": E}
    run, last = _run(tmp_path, tensors, config)
    per_head = last[f"{p}.query_key_value.weight"].reshape(H, 3, d, E)  # the model's view
    got = run.attention_spectra()["qk_sigma"].values[-1, 0]
    for h in range(H):
        want = np.linalg.svd(per_head[h, 0].T @ per_head[h, 1], compute_uv=False)[:d]
        np.testing.assert_allclose(got[h, :d], want, rtol=0, atol=1e-6 * want[0])
    ws = run.weight_spectra(f"{p}.query_key_value.weight[q]")
    _assert_svd(_sigma(ws, f"{p}.query_key_value.weight[q]"), per_head[:, 0].reshape(E, E))


def _bigcode(rng, E: int = 32, H: int = 4):
    p = "transformer.h.0.attn"
    c_attn = rng.standard_normal((3 * E, E))
    c_attn[:E] *= 3.0  # rows [0, E): the first heads' q, k and v, not W_Q
    return p, {f"{p}.c_attn.weight": c_attn, f"{p}.c_proj.weight": rng.standard_normal((E, E))}, \
        {"model_type": "gpt_bigcode", "n_head": H, "n_embd": E}


def test_weight_spectra_recorded_at_ingest_are_split_as_the_analysis_splits(tmp_path):
    """GPT-BigCode's c_attn interleaves q, k, v per head. The record made at ingest split it as nanoGPT's (rows
    [0, E) as W_Q) under the same names, and was served: sigma_1 30.40 against 25.99 rebuilt from the rows."""
    rng = np.random.default_rng(2)
    p, tensors, config = _bigcode(rng)
    run, last = _run(tmp_path, tensors, config, weights="*c_attn*")
    ws = run.weight_spectra(f"{p}.c_attn.weight[q]")
    assert ws.attrs["source"].startswith("recorded at ingest")
    want = last[f"{p}.c_attn.weight"].reshape(4, 3, 8, 32)[:, 0].reshape(32, 32)
    _assert_svd(_sigma(ws, f"{p}.c_attn.weight[q]"), want)
    rebuilt = sa.open_run(run.path).weight_spectra(f"{p}.c_attn.weight[q]", heads=4)  # heads: never the record
    assert not rebuilt.attrs["source"].startswith("recorded")


def test_a_record_split_otherwise_than_the_analysis_is_not_served(tmp_path):
    """A record made before it kept its packing split none; one of another packing (the config's head count
    changed since) is not this analysis's either: both rebuilt from the rows, with the per-head split."""
    import zarr

    rng = np.random.default_rng(3)
    p, tensors, config = _bigcode(rng)
    run, last = _run(tmp_path, tensors, config, weights="*c_attn*")
    want = last[f"{p}.c_attn.weight"].reshape(4, 3, 8, 32)[:, 0].reshape(32, 32)
    group = zarr.open_group(str(tmp_path / "r.zarr" / "weights"), mode="r+")
    for packing in (None, {f"{p}.c_attn.weight": 2}):
        attrs = dict(group.attrs)
        attrs.pop("packing", None)
        if packing is not None:
            attrs["packing"] = packing
        group.attrs.put(attrs)
        ws = sa.open_run(run.path).weight_spectra(f"{p}.c_attn.weight[q]", cache=False)
        assert not ws.attrs["source"].startswith("recorded"), packing
        _assert_svd(_sigma(ws, f"{p}.c_attn.weight[q]"), want)
    group.attrs.put({**dict(group.attrs), "packing": ["not", "a", "mapping"]})
    with pytest.raises(sa.StoreError, match="the weight record: its packing is unreadable"):
        sa.open_run(run.path).weight_spectra(cache=False)


def test_a_layer_of_another_width_than_the_config_is_refused_with_its_name():
    """A second tower (Phi-3-vision's CLIP encoder beside the language model) has heads the config does not
    give: its 16-wide layer was split into the text model's 4 heads (QK sigma 20.98 against 25.76)."""
    text, vision = "model.layers.0.self_attn", "model.vision.encoder.layers.0.self_attn"
    shapes = {f"{text}.{m}_proj.weight": (24, 24) for m in "qkvo"}
    shapes.update({f"{vision}.{m}_proj.weight": (16, 16) for m in "qkv"}, **{f"{vision}.out_proj.weight": (16, 16)})
    config = {"num_attention_heads": 4, "hidden_size": 24}
    with pytest.raises(sa.HeadCountError, match=f"'{vision}.q_proj.weight' reads 16 features where the model "
                                                "config's width is 24.*match="):
        find_attention_layers(shapes, config=config)
    (layer,) = find_attention_layers(shapes, config=config, match="model.layers.*")
    assert (layer.heads, layer.d_head) == (4, 6)
    (given,) = find_attention_layers(shapes, heads=2, config=config, match="*vision*")  # given: the user's
    assert (given.heads, given.d_head) == (2, 8)


@pytest.mark.parametrize("config, message", [
    ({"n_head": 4, "num_attention_heads": 2}, "gives the number of heads twice, num_attention_heads = 2 and "
                                              "n_head = 4"),
    ({"num_attention_heads": 2, "head_dim": 6}, "2 heads of 12 rows, but the model config says 6 rows per head"),
    ({"num_attention_heads": 2, "hidden_size": 24, "n_embd": 12}, "gives the model's width twice"),
])
def test_a_config_that_contradicts_itself_or_the_shapes_is_refused(config, message):
    shapes = {"h.0.attn.c_attn.weight": (24, 72), "h.0.attn.c_proj.weight": (24, 24)}
    with pytest.raises(sa.HeadCountError, match=message):
        find_attention_layers(shapes, config=config)
    (layer,) = find_attention_layers(shapes, heads=4, config=config)  # a given head count is the user's
    assert layer.d_head == 6
    assert find_attention_layers(shapes, config={"num_attention_heads": 2, "n_head": 2, "head_dim": 12})


def test_a_config_giving_the_head_count_twice_refuses_the_split_not_the_ingest(tmp_path):
    rng = np.random.default_rng(4)
    p, tensors, _ = _bigcode(rng)
    run, _ = _run(tmp_path, tensors, {"model_type": "gpt_bigcode", "n_head": 4, "num_attention_heads": 2},
                  weights="*c_attn*")
    with pytest.raises(sa.HeadCountError, match=f"{run.path}: the model config gives the number of heads twice"):
        run.weight_spectra()
    ws = run.weight_spectra(heads=4)
    assert f"{p}.c_attn.weight[q][head 3]" in ws["matrix"].values


def test_a_matrix_whose_squares_underflow_keeps_its_singular_values():
    """Entries near 1e-170: every square underflows to 0 and the Gram was all zeros (sigma_1 0.0)."""
    a = np.random.default_rng(5).standard_normal((7, 4)) * 1e-170
    (got,) = singular_values([a])
    np.testing.assert_allclose(got, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    (zero,) = singular_values([np.zeros((3, 2))])
    np.testing.assert_array_equal(zero, [0.0, 0.0])
