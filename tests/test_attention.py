"""Attention-circuit spectra against explicit float64 products, for every layout, and against real models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, natural
from safetensors.torch import load_file

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.weights import find_wq
from spectral_analyzer.weights.attention import circuit_spectra, product_eigenvalues, product_singular_values
from spectral_analyzer.weights.layouts import find_attention_layers, projections

TOL = 1e-9  # relative to the largest value of the head


# -- reference: the dense d_model x d_model circuits -----------------------------------------------------------


def dense_circuits(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W_Q^h^T W_K^h, W_O^h W_V^h) per head, from per-head blocks q (H, d, n), k, v (G, d, n), o (H, n, d)."""
    group = q.shape[0] // k.shape[0]
    return [(q[h].T @ k[h // group], o[h] @ v[h // group]) for h in range(q.shape[0])]


def assert_spectra(got: dict[str, np.ndarray], circuits: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Singular values and eigenvalues of each head against numpy's SVD and eigvals of the dense circuit."""
    for h, (qk, ov) in enumerate(circuits):
        d = got["qk_sigma"].shape[-1]
        for name, dense in (("qk_sigma", qk), ("ov_sigma", ov)):
            want = np.linalg.svd(dense, compute_uv=False)[:d]
            np.testing.assert_array_less(np.abs(got[name][h] - want), TOL * want[0] + 1e-300)
        assert_same_eigenvalues(got["qk_eig"][h], np.linalg.eigvals(qk))


def assert_same_eigenvalues(got: np.ndarray, full: np.ndarray) -> None:
    """*got* are the len(got) eigenvalues of largest modulus in *full*, sorted by modulus, to TOL of the largest."""
    want = full[np.argsort(-np.abs(full), kind="stable")][: got.size]
    scale = np.abs(want[0])
    left = list(want)
    for lam in got:  # each computed eigenvalue pairs off with its own reference one
        j = int(np.argmin(np.abs(np.array(left) - lam)))
        assert abs(left.pop(j) - lam) <= TOL * scale, (lam, want)
    modulus = np.abs(got)
    assert np.all(np.diff(modulus) <= TOL * scale)
    pairs = (np.abs(np.diff(modulus)) == 0) & (got.imag[:-1] != 0)  # a conjugate pair: + imaginary part first
    assert np.all(got.imag[:-1][pairs] >= 0)


def spectra_of(tensors: dict[str, np.ndarray], **options) -> tuple[list, list[dict[str, np.ndarray]]]:
    """The layers found among *tensors* and, per layer, circuit_spectra of its projections as numpy."""
    layers = find_attention_layers({k: v.shape for k, v in tensors.items()}, **options)
    out = []
    for layer in layers:
        w = [torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64)) for m in projections(layer, tensors)]
        out.append({k: v.numpy() for k, v in circuit_spectra(*w, heads=layer.heads, kv_heads=layer.kv_heads).items()})
    return layers, out


# -- kernels ----------------------------------------------------------------------------------------------------


def test_products_in_the_small_space_match_the_dense_product():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 6, 40)), rng.standard_normal((5, 6, 40))
    a[1, 3:] = 0.0  # rank-deficient: three exact zeros among the six
    a[2] *= 1e-6  # badly scaled
    sigma = product_singular_values(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    eig = product_eigenvalues(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for i in range(5):
        dense = a[i].T @ b[i]
        want = np.linalg.svd(dense, compute_uv=False)[:6]
        np.testing.assert_array_less(np.abs(sigma[i] - want), TOL * want[0])
        assert_same_eigenvalues(eig[i][np.abs(eig[i]) > TOL * np.abs(eig[i][0])], np.linalg.eigvals(dense))
    assert eig.dtype == np.complex128 and np.iscomplex(eig).any()


# -- every layout, against explicit per-head products -------------------------------------------------------------


def heads_blocks(rng, heads: int, kv_heads: int, d: int, n: int):
    return (rng.standard_normal((heads, d, n)), rng.standard_normal((kv_heads, d, n)),
            rng.standard_normal((kv_heads, d, n)), rng.standard_normal((heads, n, d)))


def stored(layout: str, q, k, v, o) -> dict[str, np.ndarray]:
    """The tensors a model of *layout* saves, made from per-head blocks (the inverse of what is tested)."""
    heads, d, n = q.shape
    Q, K, V = (x.reshape(-1, n) for x in (q, k, v))  # head h: rows [h d, (h + 1) d)
    O = np.concatenate(list(o), axis=1)  # head h: columns [h d, (h + 1) d)
    if layout == "mha_packed":
        return {"blocks.3.attn.in_proj_weight": np.vstack([Q, K, V]), "blocks.3.attn.out_proj.weight": O}
    if layout == "bert":
        p = "encoder.layer.1.attention"
        return {f"{p}.self.query.weight": Q, f"{p}.self.key.weight": K, f"{p}.self.value.weight": V,
                f"{p}.output.dense.weight": O}
    if layout == "llama":
        p = "model.layers.0.self_attn"
        return {f"{p}.q_proj.weight": Q, f"{p}.k_proj.weight": K, f"{p}.v_proj.weight": V, f"{p}.o_proj.weight": O}
    if layout == "neox":  # per head, q then k then v rows
        return {"gpt_neox.layers.2.attention.query_key_value.weight":
                np.concatenate([q, k, v], axis=1).reshape(3 * heads * d, n),
                "gpt_neox.layers.2.attention.dense.weight": O}
    if layout == "gpt2":  # Conv1D: y = x @ W, W (in, out); q, k, v along the columns
        return {"h.0.attn.c_attn.weight": np.hstack([Q.T, K.T, V.T]), "h.0.attn.c_proj.weight": O.T}
    if layout == "bigcode":  # GPT-BigCode's nn.Linear c_attn (3E, E), per head q then k then v rows
        return {"transformer.h.0.attn.c_attn.weight": np.concatenate([q, k, v], axis=1).reshape(3 * heads * d, n),
                "transformer.h.0.attn.c_proj.weight": O}
    if layout == "nanogpt":  # nn.Linear c_attn (3E, E), c_proj (E, E)
        return {"transformer.h.0.attn.c_attn.weight": np.vstack([Q, K, V]), "transformer.h.0.attn.c_proj.weight": O}
    raise AssertionError(layout)


LAYOUTS = {  # test layout: (layout recognised, heads, kv_heads, d_head, d_model)
    "mha_packed": ("mha_packed", 4, 4, 5, 20),
    "bert": ("separate", 3, 3, 4, 12),
    "llama": ("separate", 4, 4, 3, 16),
    "llama_gqa": ("separate", 6, 2, 3, 16),
    "neox": ("neox_packed", 4, 4, 4, 16),
    "gpt2": ("conv1d_packed", 2, 2, 6, 12),
    "nanogpt": ("linear_packed", 3, 3, 4, 12),
    "bigcode": ("neox_packed", 3, 3, 4, 12),  # told apart from nanogpt by the config's model_type
}
MODEL_TYPES = {"bigcode": "gpt_bigcode", "nanogpt": "gpt2"}


@pytest.mark.parametrize("case", LAYOUTS)
def test_every_layout_against_explicit_products_per_head(case):
    layout, heads, kv_heads, d, n = LAYOUTS[case]
    rng = np.random.default_rng(len(case))
    blocks = heads_blocks(rng, heads, kv_heads, d, n)
    tensors = stored(case.removesuffix("_gqa"), *blocks)
    config = {"num_attention_heads": heads, "model_type": MODEL_TYPES.get(case, "other")}
    (layer,), (got,) = spectra_of(tensors, config=config)
    assert (layer.layout, layer.heads, layer.kv_heads, layer.d_head, layer.d_model) == (layout, heads, kv_heads, d, n)
    assert got["qk_sigma"].shape == (heads, d)
    assert_spectra(got, dense_circuits(*blocks))
    # the head split itself: W_Q^h, and W_K of the head's group, are the blocks the model was made of
    w_q, w_k, _, w_o = projections(layer, tensors)
    group = heads // kv_heads
    for h in range(heads):
        np.testing.assert_array_equal(w_q[h * d : (h + 1) * d], blocks[0][h])
        np.testing.assert_array_equal(w_k[(h // group) * d : (h // group + 1) * d], blocks[1][h // group])
        np.testing.assert_array_equal(w_o[:, h * d : (h + 1) * d], blocks[3][h])


def _run_of(tmp_path, tensors: dict[str, np.ndarray], config: dict, n: int = 3) -> sa.Run:
    """A run of *n* checkpoints of *tensors*, each moved by noise, with a config.json beside them."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    for i in range(n):
        state = {k: torch.from_numpy((v + 0.1 * i * rng.standard_normal(v.shape)).astype(np.float32))
                 for k, v in tensors.items()}
        save_file(state, str(src / f"step_{i}.safetensors"))
        if i == n - 1:
            last = {k: t.double().numpy() for k, t in state.items()}
    return sa.ingest(src, tmp_path / "r.zarr"), last


def _assert_sigma(ws, matrix: str, block: np.ndarray) -> None:
    """Against the source weights: theta rebuilt from float32 deltas carries their rounding (~1e-8)."""
    want = np.linalg.svd(block, compute_uv=False)
    got = ws["sigma"].sel(matrix=matrix).values[-1][: want.size]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want[0])


def test_weight_spectra_split_each_projection_into_the_heads_it_has(tmp_path):
    """Grouped-query attention, 6 query heads sharing 2 key/value heads of 3 rows: heads=6 gives W_Q's six row
    blocks, W_K's and W_V's two (kv head g), and W_O's six column blocks (what each head writes through);
    a matrix that is no attention projection stays whole."""
    rng = np.random.default_rng(2)
    tensors = stored("llama", *heads_blocks(rng, 6, 2, 3, 16))
    tensors["model.layers.0.mlp.up_proj.weight"] = rng.standard_normal((12, 16))
    run, last = _run_of(tmp_path, tensors, {"num_attention_heads": 6, "num_key_value_heads": 2})
    ws = run.weight_spectra(heads=6)
    p = "model.layers.0.self_attn"
    names = list(ws["matrix"].values)
    assert [n for n in names if n.startswith(f"{p}.k_proj")] == [f"{p}.k_proj.weight[kv head {g}]" for g in (0, 1)]
    assert "model.layers.0.mlp.up_proj.weight" in names
    for h in range(6):
        _assert_sigma(ws, f"{p}.q_proj.weight[head {h}]", last[f"{p}.q_proj.weight"][3 * h : 3 * h + 3])
        _assert_sigma(ws, f"{p}.o_proj.weight[head {h}]", last[f"{p}.o_proj.weight"][:, 3 * h : 3 * h + 3])
    for g in range(2):
        _assert_sigma(ws, f"{p}.v_proj.weight[kv head {g}]", last[f"{p}.v_proj.weight"][3 * g : 3 * g + 3])
    with pytest.raises(sa.SelectionError, match="none of the matched matrices is one"):
        run.weight_spectra("*up_proj*", heads=6)


@pytest.mark.parametrize("case", ["neox", "bigcode"])
def test_weight_spectra_of_per_head_packings_split_q_k_v_as_the_model_does(case, tmp_path):
    """GPT-NeoX's query_key_value and GPT-BigCode's c_attn interleave q, k, v per head: with the config's head
    count, [q] is every head's q rows (the grokking summary's W_Q); without it the tensor stays whole."""
    rng = np.random.default_rng(3)
    q, k, v, o = heads_blocks(rng, 4, 4, 3, 12)
    tensors = stored(case, q, k, v, o)
    packed = next(n for n in tensors if n.endswith(("query_key_value.weight", "c_attn.weight")))
    run, last = _run_of(tmp_path, tensors, {"num_attention_heads": 4, "model_type": MODEL_TYPES.get(case, case)})
    ws = run.weight_spectra(packed)
    assert list(ws["matrix"].values) == [f"{packed}[{part}]" for part in "qkv"]
    per_head = last[packed].reshape(4, 3, 3, 12)
    for i, part in enumerate("qkv"):
        _assert_sigma(ws, f"{packed}[{part}]", per_head[:, i].reshape(12, 12))
    assert find_wq(run.store, None) == f"{packed}[q]"
    (layer,) = find_attention_layers({n: t.shape for n, t in last.items()}, config=run.provenance["model_config"])
    assert layer.layout == "neox_packed" and layer.query == f"{packed}[q]"


def test_heads_wider_than_the_model(tmp_path):
    """d_head > d_model (head_dim set apart from the width, or heads=1 on a wide W_Q): each head's circuits have
    rank d_model, the rest NaN."""
    rng = np.random.default_rng(4)
    q, k, v, o = heads_blocks(rng, 2, 2, 8, 6)
    run, last = _run_of(tmp_path, stored("llama", q, k, v, o), {"num_attention_heads": 2})
    ds = run.attention_spectra()
    assert ds.sizes["rank"] == 8
    got = ds["qk_sigma"].values[-1, 0]
    assert np.isnan(got[:, 6:]).all()
    p = "model.layers.0.self_attn"
    for h in range(2):
        qk = last[f"{p}.q_proj.weight"][8 * h : 8 * h + 8].T @ last[f"{p}.k_proj.weight"][8 * h : 8 * h + 8]
        want = np.linalg.svd(qk, compute_uv=False)
        np.testing.assert_allclose(got[h, :6], want, rtol=0, atol=1e-6 * want[0])


def test_head_count_from_the_config_or_given_and_refused_with_the_tensor_named():
    rng = np.random.default_rng(1)
    tensors = stored("llama", *heads_blocks(rng, 4, 2, 3, 12))
    shapes = {k: v.shape for k, v in tensors.items()}
    (layer,) = find_attention_layers(shapes, config={"n_head": 4, "num_key_value_heads": 2})
    assert (layer.heads, layer.kv_heads, layer.query) == (4, 2, "model.layers.0.self_attn.q_proj.weight")
    bert = {k: v.shape for k, v in stored("bert", *heads_blocks(rng, 4, 4, 3, 12)).items()}
    (whole,) = find_attention_layers(bert, heads=1, config={"num_attention_heads": 4})  # given: over the config
    assert (whole.heads, whole.kv_heads, whole.d_head) == (1, 1, 12)  # the layer's whole W_Q^T W_K
    with pytest.raises(sa.HeadCountError, match="number of heads of 'model.layers.0.self_attn.q_proj.weight' is "
                                                "unknown.*pass heads=H"):
        find_attention_layers(shapes)
    with pytest.raises(sa.HeadCountError, match="'model.layers.0.self_attn.q_proj.weight' has 12 rows, which do "
                                                "not split into 5 heads"):
        find_attention_layers(shapes, heads=5)
    with pytest.raises(sa.HeadCountError, match="k_proj.weight' has 2 key/value heads.*num_key_value_heads = 4"):
        find_attention_layers(shapes, config={"num_attention_heads": 4, "num_key_value_heads": 4})
    with pytest.raises(sa.HeadCountError, match="k_proj.weight' has 6 rows: not a whole number"):
        find_attention_layers(shapes, heads=3)  # d_head 4: 6 key rows are 1.5 heads
    assert issubclass(sa.HeadCountError, sa.SelectionError)
    with pytest.raises(sa.SelectionError, match="no attention layer recognised"):
        find_attention_layers({"mlp.fc.weight": (4, 4)}, heads=1)
    with pytest.raises(sa.SelectionError, match=re.escape("no attention layer matches 'enc*'")):
        find_attention_layers(shapes, heads=4, match="enc*")


# -- real models: the circuits give the model's own attention pattern and output ----------------------------------


def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 32, "max_position_embeddings": 8}
    config, cls = {
        "gpt2": (transformers.GPT2Config(n_layer=1, n_embd=16, n_head=4, vocab_size=32, n_positions=8,
                                         bos_token_id=0, eos_token_id=0), transformers.GPT2Model),
        "bert": (transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=4,
                                         intermediate_size=32, **small), transformers.BertModel),
        "llama": (transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=32, **small),
                  transformers.LlamaModel),
        "neox": (transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=4,
                                            intermediate_size=32, **small), transformers.GPTNeoXModel),
    }[kind]
    config._attn_implementation = "eager"  # attention probabilities returned
    return cls(config).eval(), config


ATTENTION_MODULES = {  # the attention module (its input is the x of the circuits) and its output projection
    "gpt2": ("h.0.attn", "h.0.attn.c_proj"),
    "bert": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.output.dense"),
    "llama": ("layers.0.self_attn", "layers.0.self_attn.o_proj"),
    "neox": ("layers.0.attention", "layers.0.attention.dense"),
}


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "neox", "mha"])
def test_circuits_reproduce_the_models_attention(kind):
    """softmax(x W_QK^h x^T / sqrt(d_head)) is the model's attention of head h, sum_h A^h x W_OV^h^T its output.

    Biases are zeroed, rotary positions all 0 (the rotation is then the identity), weights scaled up so that the
    attention is far from uniform; the model computes in float32.
    """
    torch.manual_seed(0)
    if kind == "mha":
        model = torch.nn.MultiheadAttention(16, 4, bias=False, batch_first=True)
        config = {"num_attention_heads": 4}
    else:
        model, hf_config = _hf_model(kind)
        config = hf_config.to_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 2 and ("attn" in name or "attention" in name or kind == "mha"):
                p.normal_(0.0, 0.6)
    tensors = {k: v.double().numpy() for k, v in model.state_dict().items()}
    (layer,), _ = spectra_of({k: v for k, v in tensors.items() if v.ndim == 2}, config=config)
    w_q, w_k, w_v, w_o = (np.asarray(m) for m in projections(layer, tensors))
    d, group = layer.d_head, layer.heads // layer.kv_heads
    blocks = (w_q.reshape(layer.heads, d, -1), w_k.reshape(layer.kv_heads, d, -1),
              w_v.reshape(layer.kv_heads, d, -1), w_o.reshape(-1, layer.heads, d).transpose(1, 0, 2))
    circuits = dense_circuits(*blocks)
    assert group == (2 if kind == "llama" else 1)

    seen = {}
    if kind == "mha":
        x = torch.randn(1, 5, 16)
        out, probs = model(x, x, x, need_weights=True, average_attn_weights=False)
        seen["x"], seen["out"], causal = x[0], out[0], False
    else:
        attn, out_proj = (model.get_submodule(m) for m in ATTENTION_MODULES[kind])

        def take_input(module, args, kwargs):
            seen["x"] = (args[0] if args else kwargs["hidden_states"])[0]

        def take_output(module, args, output):
            seen["out"] = output[0]

        attn.register_forward_pre_hook(take_input, with_kwargs=True)
        out_proj.register_forward_hook(take_output)
        ids = torch.randint(32, (1, 5), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # an explicit mask: with all positions 0 and none, transformers >= 5.25 reads packed sequences
            probs = model(ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
                          output_attentions=True).attentions[0]
        causal = kind != "bert"
    x = seen["x"].detach().double().numpy()
    probs = probs[0].detach().double().numpy()
    mask = np.triu(np.full((5, 5), -np.inf), 1) if causal else 0.0
    expected_out = 0.0
    for h, (qk, ov) in enumerate(circuits):
        pattern = _softmax(x @ qk @ x.T / np.sqrt(d) + mask)
        assert pattern.std() > 0.05  # not uniform: the check can tell a wrong circuit
        np.testing.assert_allclose(probs[h], pattern, atol=2e-5)
        expected_out = expected_out + pattern @ x @ ov.T
    np.testing.assert_allclose(seen["out"].detach().double().numpy(), expected_out, rtol=1e-4,
                               atol=1e-4 * np.abs(expected_out).max())


# -- stores: the shipped grokking run and HF-style runs, against explicit products ---------------------------------


@pytest.fixture(scope="module")
def wd1(tmp_path_factory):
    return sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("att") / "wd1.zarr")


def rebuilt(run: sa.Run, name: str) -> np.ndarray:
    """theta of tensor *name* at every checkpoint, base + cumulative deltas in float64 (step, *shape)."""
    t = run.tensors.sel(tensor=name)
    o, size, shape = int(t["offset"]), int(t["size"]), t["shape"].item()
    base = run.base.values[o : o + size].astype(np.float64)
    deltas = run.deltas.values[:, o : o + size].astype(np.float64)
    return np.concatenate([base[None], base + np.cumsum(deltas, axis=0)]).reshape(-1, *shape)


def _per_checkpoint(ds, layer: str, step: int) -> dict[str, np.ndarray]:
    part = ds.sel(layer=layer).isel(step=step)
    return {"qk_sigma": part["qk_sigma"].values, "ov_sigma": part["ov_sigma"].values,
            "qk_eig": part["qk_eig_abs"].values * np.exp(1j * part["qk_eig_phase"].values)}


def test_shipped_run_against_products_of_the_rebuilt_and_the_source_weights(wd1):
    with pytest.raises(sa.HeadCountError, match="number of heads of 'layers.0.attn.in_proj_weight\\[q\\]'"):
        wd1.attention_spectra()  # no config.json in the fixture
    ds = wd1.attention_spectra(heads=4)
    assert ds.sizes == {"step": 51, "layer": 1, "head": 4, "rank": 8}
    assert ds["layout"].item() == "mha_packed" and ds.attrs["heads_source"] == "argument"
    w_in, w_out = rebuilt(wd1, "layers.0.attn.in_proj_weight"), rebuilt(wd1, "layers.0.attn.out_proj.weight")
    files = sorted((FIXTURES / "grokking" / "wd1").glob("*.safetensors"), key=lambda f: natural(f.name))
    for s in range(0, 51, 5):
        q, k, v = (w.reshape(4, 8, 32) for w in np.split(w_in[s], 3))
        o = w_out[s].reshape(32, 4, 8).transpose(1, 0, 2)
        circuits = dense_circuits(q, k, v, o)
        got = _per_checkpoint(ds, "layers.0.attn", s)
        assert_spectra(got, circuits)
        # the source checkpoint: the rebuilt weights are within float32 rounding of the deltas (~1e-8 relative)
        source = load_file(str(files[s]))["layers.0.attn.in_proj_weight"].double().numpy()
        q, k, _ = (w.reshape(4, 8, 32) for w in np.split(source, 3))
        for h in range(4):
            want = np.linalg.svd(q[h].T @ k[h], compute_uv=False)[:8]
            np.testing.assert_allclose(got["qk_sigma"][h], want, rtol=0, atol=1e-6 * want[0])
    modulus = ds["qk_eig_abs"].values
    np.testing.assert_array_equal(ds["qk_ratio_12"].values, modulus[..., 0] / modulus[..., 1])
    np.testing.assert_array_equal(ds["qk_gap_23"].values, modulus[..., 1] - modulus[..., 2])
    assert wd1.attention_spectra(heads=4).identical(ds)  # read back from the store's cache


def _save_run(folder, model, n: int = 3) -> list[dict[str, np.ndarray]]:
    """*n* checkpoint-<step>/ folders as save_pretrained writes them (config.json beside the weights)."""
    states = []
    gen = torch.Generator().manual_seed(2)
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(folder / f"checkpoint-{10 * i}"))
        states.append({k: v.double().numpy() for k, v in model.state_dict().items()})
    return states


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_runs_head_count_from_their_config_and_circuits_from_their_layout(kind, tmp_path):
    model, _ = _hf_model(kind)
    states = _save_run(tmp_path / "ckpts", model)
    run = sa.ingest(tmp_path / "ckpts", tmp_path / "r.zarr")
    assert run.provenance["model_config"]["num_attention_heads" if kind == "bert" else "n_head"] == 4
    ds = run.attention_spectra()
    assert ds.attrs["heads_source"] == "model config" and ds.sizes["head"] == 4 and ds.sizes["rank"] == 4
    layer = str(ds["layer"].values[0])
    for s, state in enumerate(states):
        if kind == "gpt2":  # Conv1D: x @ W, q | k | v along the columns; c_proj (in, out)
            c_attn, c_proj = state["h.0.attn.c_attn.weight"], state["h.0.attn.c_proj.weight"]
            q, k, v = (c_attn[:, i * 16 : (i + 1) * 16].T.reshape(4, 4, 16) for i in range(3))
            o = c_proj.T.reshape(16, 4, 4).transpose(1, 0, 2)
        else:
            p = "encoder.layer.0.attention"
            q, k, v = (state[f"{p}.self.{n}.weight"].reshape(4, 4, 16) for n in ("query", "key", "value"))
            o = state[f"{p}.output.dense.weight"].reshape(16, 4, 4).transpose(1, 0, 2)
        got = _per_checkpoint(ds, layer, s)
        for h, (qk, ov) in enumerate(dense_circuits(q, k, v, o)):  # source weights: float32 rounding of deltas
            for name, dense in (("qk_sigma", qk), ("ov_sigma", ov)):
                want = np.linalg.svd(dense, compute_uv=False)[:4]
                np.testing.assert_allclose(got[name][h], want, rtol=0, atol=1e-6 * want[0])
    if kind == "gpt2":  # weight_spectra splits c_attn along its columns, and each part into head row blocks
        ws = run.weight_spectra("*c_attn.weight[q]", heads=4)
        name = "h.0.attn.c_attn.weight[q]"
        assert list(ws["matrix"].values) == [f"{name}[head {h}]" for h in range(4)]
        for s, state in enumerate(states):
            for h in range(4):
                block = state["h.0.attn.c_attn.weight"][:, 4 * h : 4 * (h + 1)]
                want = np.linalg.svd(block, compute_uv=False)
                got = ws["sigma"].sel(matrix=f"{name}[head {h}]").values[s]
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want[0])
        assert find_wq(run.store, None) == name  # the grokking summary's W_Q of a GPT-2


def test_qk_grokking_summary_against_an_independent_computation(wd1):
    g = wd1.grokking(operator="qk", heads=4)
    assert bool(g["grokked"]) and int(g["grok_step"]) == 1400 and g.attrs["layer"] == "layers.0.attn"
    files = sorted((FIXTURES / "grokking" / "wd1").glob("*.safetensors"), key=lambda f: natural(f.name))
    steps = np.array([int(f.stem.split("_")[1]) for f in files])
    w_in = rebuilt(wd1, "layers.0.attn.in_proj_weight")
    modulus = np.zeros((len(steps), 4, 3))
    for s in range(len(steps)):
        q, k = (w.reshape(4, 8, 32) for w in np.split(w_in[s], 3)[:2])
        for h in range(4):
            lam = np.linalg.eigvals(q[h].T @ k[h])
            modulus[s, h] = np.sort(np.abs(lam))[::-1][:3]
    ratio, gap = modulus[..., 0] / modulus[..., 1], modulus[..., 1] - modulus[..., 2]
    last = np.flatnonzero(steps <= 1400)[-1]
    for h in range(4):
        peak = np.argmax(gap[: last + 1, h])
        # an exactly closed gap (a conjugate pair at lambda_2, lambda_3) makes the decline infinite
        np.testing.assert_allclose(float(g["qk_ratio_12_grok"][h]), ratio[last, h], rtol=1e-6)
        np.testing.assert_allclose(float(g["qk_ratio_12_end"][h]), ratio[-1, h], rtol=1e-6)
        np.testing.assert_allclose(float(g["qk_ratio_12_early"][h]), ratio[steps < 1400, h].mean(), rtol=1e-6)
        assert float(g["qk_gap_23_peak_step"][h]) == steps[peak]
        want = gap[peak, h] / gap[last, h] if gap[last, h] > 0 else np.inf
        assert float(g["qk_gap_23_decline"][h]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="unknown operator 'ov'"):
        wd1.grokking(operator="ov")


def test_cli_attention_and_qk_grokking(wd1, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["attention", wd1.path, "--heads", "4", "--layer", "layers.0.*",
                                  "-o", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'a.csv'}"
    assert lines[1].split() == ["step", "layer", "head", "|l1|", "|l2|", "|l3|", "|l1|/|l2|", "|l2|-|l3|", "qk_s1",
                                "ov_s1"]
    assert lines[2].split()[:3] == ["0", "layers.0.attn", "0"] and len(lines) == 2 + 51 * 4 + 1
    csv = (tmp_path / "a.csv").read_text().splitlines()
    assert csv[0].startswith("layer,head,step,") and "qk_eig_abs_8" in csv[0] and len(csv) == 1 + 4 * 51
    result = runner.invoke(main, ["grokking", wd1.path, "--operator", "qk", "--heads", "4", "-o",
                                  str(tmp_path / "g.nc")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:5] == ["store", "layer", "head", "grokked", "grok_step"]
    assert [line.split()[2:5] for line in lines[2:6]] == [[str(h), "yes", "1400"] for h in range(4)]
    for args, message in (
        (["attention", wd1.path, "--heads", "3"], "'layers.0.attn.in_proj_weight[q]' has 32 rows, which do not "
                                                  "split into 3 heads"),
        (["attention", wd1.path], "the number of heads of 'layers.0.attn.in_proj_weight[q]' is unknown"),
        (["grokking", wd1.path, "--operator", "qk"], "is unknown"),
        (["attention", wd1.path, "--heads", "4", "--layer", "nothing*"], "no attention layer matches"),
    ):
        bad = runner.invoke(main, args)
        assert bad.exit_code == 1 and len(bad.output.splitlines()) == 1, bad.output
        assert bad.output.startswith("Error: ") and message in bad.output, bad.output


def test_model_config_is_kept_at_ingest_and_a_bad_one_ignored(tmp_path):
    from conftest import write_run

    src = tmp_path / "src"
    write_run(src, 3, {"a.q_proj.weight": (8, 4), "a.k_proj.weight": (4, 4), "a.v_proj.weight": (4, 4),
                       "a.o_proj.weight": (4, 8)})
    (src / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_key_value_heads": 1,
                                                 "use_cache": True, "hidden_size": 4, "architectures": ["X"]}))
    run = sa.ingest(src, tmp_path / "r.zarr")
    assert run.provenance["model_config"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 4}
    ds = run.attention_spectra()
    assert (int(ds["n_heads"].item()), int(ds["n_kv_heads"].item()), int(ds["d_head"].item())) == (2, 1, 4)
    (src / "config.json").write_text("{not json")
    run = sa.ingest(src, tmp_path / "bad.zarr")
    assert "model_config" not in run.provenance
    with pytest.raises(sa.HeadCountError, match="pass heads=H"):
        run.attention_spectra()


def test_recorder_keeps_a_transformers_models_config(tmp_path):
    model = torch.nn.Linear(4, 4)
    model.config = type("Config", (), {"to_dict": lambda self: {"n_head": 2, "n_embd": 4, "use_cache": True}})()
    recorder = sa.Recorder(tmp_path / "live.zarr", model)
    recorder.record(0)
    assert sa.open_run(tmp_path / "live.zarr").provenance["model_config"] == {"n_head": 2, "n_embd": 4}


def test_an_infinite_early_qk_ratio_is_not_left_out_of_the_mean():
    """A head of rank 1 before grokking (|lambda_2| = 0: ratio inf) had its qk_ratio_12_early taken from its
    finite checkpoints alone (1.63 where the mean over the checkpoints before grokking is inf); NaN, a ratio
    not defined, is still left out, as in the trajectory's R_early."""
    from spectral_analyzer.weights.grok import _mean

    got = _mean(np.array([[np.inf, 1.0, np.nan], [2.0, np.nan, np.nan], [4.0, 3.0, np.nan]]))
    assert got[0] == np.inf and got[1] == 2.0 and np.isnan(got[2])
