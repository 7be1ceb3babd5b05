from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, natural
from safetensors.torch import load_file

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.weights.kernel import TOLERANCE, split_heads, split_packed

WQ = "layers.0.attn.in_proj_weight[q]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return {name: sa.ingest(FIXTURES / "grokking" / name, root / f"{name}.zarr") for name in ("wd1", "wd0")}


def source_weights(name: str) -> list[tuple[int, dict[str, torch.Tensor]]]:
    files = sorted((FIXTURES / "grokking" / name).glob("*.safetensors"), key=lambda f: natural(f.name))
    return [(int(f.stem.split("_")[1]), load_file(str(f))) for f in files]


def test_singular_values_match_source_checkpoints(runs):
    """Reconstruction error and Weyl's inequality set the tolerance.

    theta_i is rebuilt as base + sum_k d_k with each float32 delta rounded once
    (relative error <= 2^-24 per entry), so the rebuilt matrix differs from the
    source by E_i with ||E_i||_F <= sum_k 2^-24 ||d_k||_F; by Weyl's inequality
    every singular value moves by at most ||E_i||_2 <= ||E_i||_F. The test
    measures ||E_i||_F directly and checks the singular values against it.
    """
    run = runs["wd1"]
    ws = run.weight_spectra()  # every 2-D weight
    assert "layers.0.attn.in_proj_weight[k]" in ws["matrix"].values
    for k, (step, state) in enumerate(source_weights("wd1")):
        assert ws["step"].values[k] == step
        for name in ("layers.0.mlp.0.weight", "unembed.weight", "embed.weight"):
            w = state[name].double().numpy()
            want = np.linalg.svd(w, compute_uv=False)
            got = ws["sigma"].sel(matrix=name).values[k, : want.size]
            bound = _reconstruction_error(run, name, k, w)
            assert np.max(np.abs(got - want)) <= bound + 1e-12 * want[0]
            assert np.max(np.abs(got - want)) <= 1e-6 * want[0]


def _reconstruction_error(run, name, k, source):
    t = run.tensors.sel(tensor=name)
    o, s = int(t["offset"]), int(t["size"])
    theta = run.base.values[o : o + s].astype(np.float64) + run.deltas.values[:k, o : o + s].astype(np.float64).sum(0)
    return float(np.linalg.norm(theta.reshape(source.shape) - source))


def test_in_proj_split_is_multihead_attentions_own(runs):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True)
    w = mha.in_proj_weight.detach().double()
    b = mha.in_proj_bias.detach().double()
    x = torch.randn(5, 12, dtype=torch.float64)
    q, k, v = torch.nn.functional._in_projection_packed(x, x, x, w, b)
    parts = dict(split_packed("attn.in_proj_weight", w.numpy()))
    bias = b.numpy().reshape(3, 12)
    for (name, want), bias_part in zip((("q", q), ("k", k), ("v", v)), bias):
        got = x.numpy() @ parts[f"attn.in_proj_weight[{name}]"].T + bias_part
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
    heads = split_heads("q", parts["attn.in_proj_weight[q]"], 3)
    assert [n for n, _ in heads] == ["q[head 0]", "q[head 1]", "q[head 2]"] and heads[1][1].shape == (4, 12)
    ws = runs["wd1"].weight_spectra(WQ, heads=4)
    assert list(ws["matrix"].values) == [f"{WQ}[head {h}]" for h in range(4)]
    assert ws.sizes["rank"] == 8


def test_derived_matrix_quantities(runs):
    ws = runs["wd1"].weight_spectra("*mlp*", top=5)
    full = runs["wd1"].weight_spectra("*mlp*")
    assert ws.sizes["rank"] == 5
    s = full["sigma"].values
    np.testing.assert_allclose(ws["sigma_ratio_12"].values, s[..., 0] / s[..., 1])
    np.testing.assert_allclose(ws["g23"].values, s[..., 1] - s[..., 2])
    np.testing.assert_allclose(ws["stable_rank"].values, np.nansum(s**2, axis=-1) / s[..., 0] ** 2)


def test_grokking_summary_against_independent_computation(runs):
    for name, run in runs.items():
        g = run.grokking(metric="test_acc", threshold=0.95, window=10)
        acc = run.metrics["test_acc"]
        hits = acc["step"].values[acc.values >= 0.95]
        assert bool(g["grokked"]) == (name == "wd1")
        # independent: spectra from a float64 SVD of the stored deltas
        x = run.deltas.values.astype(np.float64)
        steps = run.steps
        ends = np.arange(9, x.shape[0])
        sig = np.array([np.linalg.svd(x[e - 9 : e + 1], compute_uv=False) for e in ends])
        ratio = sig[:, :-1] / sig[:, 1:]
        r = ratio.max(axis=1)
        g23 = sig[:, 1] ** 2 - sig[:, 2] ** 2
        wstep = steps[ends]
        k_mode = np.bincount(ratio.argmax(axis=1) + 1).argmax()
        assert int(g["k_star_mode"]) == k_mode
        wq = dict(source_weights(name))
        wq_ratio = {s: np.linalg.svd(st["layers.0.attn.in_proj_weight"].double().numpy()[:32], compute_uv=False)
                    for s, st in wq.items()}
        end_step = max(wq_ratio)
        assert float(g["wq_sigma_ratio_end"]) == pytest.approx(wq_ratio[end_step][0] / wq_ratio[end_step][1], rel=1e-6)
        if name == "wd1":
            grok = int(hits[0])
            assert int(g["grok_step"]) == grok == 1400
            last = np.flatnonzero(wstep <= grok)[-1]
            peak = np.argmax(g23[: last + 1])
            assert float(g["g23_decline"]) == pytest.approx(g23[peak] / g23[last], rel=1e-8)
            assert int(g["g23_peak_step"]) == wstep[peak]
            assert float(g["R_early"]) == pytest.approx(r[wstep < grok].mean(), rel=1e-9)
            assert float(g["R_grok"]) == pytest.approx(r[last], rel=1e-9)
            s = wq_ratio[grok]
            assert float(g["wq_sigma_ratio_grok"]) == pytest.approx(s[0] / s[1], rel=1e-6)
        else:
            assert hits.size == 0 and np.isnan(float(g["grok_step"]))
            assert np.isnan(float(g["R_grok"])) and np.isnan(float(g["g23_decline"]))
            assert float(g["R_early"]) == pytest.approx(r.mean(), rel=1e-9)


def test_cli_weights_and_grokking(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["grokking", runs["wd1"].path, runs["wd0"].path, "-o", str(tmp_path / "g.csv")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()[1:]  # after "wrote g.csv"
    assert lines[0].split()[:3] == ["store", "grokked", "grok_step"]
    assert lines[1].split()[1:3] == ["yes", "1400"] and lines[2].split()[1:3] == ["no", "-"]
    assert lines[-1].startswith("grokked: 1 of 2 runs; earliest at step 1400")
    csv = (tmp_path / "g.csv").read_text().splitlines()
    assert csv[0].startswith("run,grokked,grok_step") and len(csv) == 3
    result = runner.invoke(main, ["weights", runs["wd1"].path, "--match", WQ, "--top", "4", "--no-progress",
                                 "-o", str(tmp_path / "w.csv")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2].split()[:2] == ["0", WQ]
    header = (tmp_path / "w.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["matrix", "step", "sigma_ratio_12"] and "sigma_4" in header
    bad = runner.invoke(main, ["weights", runs["wd1"].path, "--match", "nothing*"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: no 2-D weight matches")
    bad = runner.invoke(main, ["grokking", runs["wd1"].path, "--metric", "val_acc"])
    assert bad.exit_code == 1 and "metric 'val_acc' is not logged" in bad.output


def test_recorded_at_ingest_are_the_source_singular_values(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = sorted((FIXTURES / "grokking" / "wd1").glob("*.safetensors"), key=lambda f: natural(f.name))
    for f in files[:30]:
        (src / f.name).symlink_to(f)
    run = sa.ingest(src, tmp_path / "r.zarr", weights=[WQ, "unembed.weight"])
    for f in files[30:]:  # appended rows record theirs too
        (src / f.name).symlink_to(f)
    run = sa.ingest(src, tmp_path / "r.zarr")
    ws = run.weight_spectra([WQ, "unembed.weight"])
    assert ws.attrs["source"] == "recorded at ingest from the source tensors"
    for k, (_, state) in enumerate(source_weights("wd1")):
        want_q = np.linalg.svd(state["layers.0.attn.in_proj_weight"].double().numpy()[:32], compute_uv=False)
        want_u = np.linalg.svd(state["unembed.weight"].double().numpy(), compute_uv=False)
        # the kernel's stated accuracy: every value to TOLERANCE sigma_1, the top 10 to 1e-12 of themselves
        for got, want in ((ws["sigma"].sel(matrix=WQ).values[k], want_q),
                          (ws["sigma"].sel(matrix="unembed.weight").values[k, : want_u.size], want_u)):
            np.testing.assert_array_less(np.abs(got - want), TOLERANCE * want[0])
            np.testing.assert_allclose(got[:10], want[:10], rtol=1e-12, atol=0)
    # matrices that were not recorded are rebuilt from the deltas
    assert run.weight_spectra("embed.weight").attrs["source"].startswith("theta_i = base")
    with pytest.raises(sa.StoreError, match="recorded for"):
        sa.ingest(src, tmp_path / "r.zarr", weights=["*mlp*"])


@pytest.mark.parametrize("sizes, made, source", [
    ({"attn.in_proj_weight": (12, 4), "attn.in_proj_weight[q]": (6, 5)}, "attn.in_proj_weight[q]",
     "attn.in_proj_weight"),
    ({"moe.experts.w": (2, 3, 3), "moe.experts.w[expert 0]": (5, 4)}, "moe.experts.w[expert 0]", "moe.experts.w"),
])
def test_a_made_matrix_name_that_is_another_tensors_is_refused(tmp_path, sizes, made, source):
    """The q of a packed projection (``w[q]``) or an expert of a stacked tensor (``w[expert 0]``) named like a
    tensor of the model: one column held both (the made matrix NaN at every step, the other's values under the
    shared name); refused in one line, at analysis and when an ingest records the weights."""
    from conftest import write_run

    write_run(tmp_path / "src", 3, sizes, seed=4)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    message = f"the matrix '{made}' made from tensor '{source}' has the name of tensor '{made}'"
    with pytest.raises(sa.SelectionError, match=message.replace("[", r"\[")):
        run.weight_spectra()
    with pytest.raises(sa.SelectionError, match="has the name of tensor"):
        sa.ingest(tmp_path / "src", tmp_path / "w.zarr", weights="*")
    out = CliRunner().invoke(main, ["weights", str(tmp_path / "r.zarr"), "--no-progress"])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "has the name of tensor" in out.output
    apart = sa.ingest(tmp_path / "src", tmp_path / "apart.zarr", exclude=[made.replace("[", "[[]")])
    assert made in [str(m) for m in apart.weight_spectra()["matrix"].values]  # the made one, alone


def test_stacked_experts_are_recorded_at_ingest(tmp_path):
    """ingest(weights='*') of a stacked mixture-of-experts tensor raised KeyError: the record looked its
    matrices up by the experts' names while the readers hand it the stacked tensor."""
    from conftest import write_run

    paths = write_run(tmp_path / "src", 3, {"mlp.experts.down_proj": (3, 8, 5), "head": (4, 6)}, seed=1)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", weights="*")
    ws = run.weight_spectra()
    assert [str(m) for m in ws["matrix"].values] == ["head"] + [f"mlp.experts.down_proj[expert {e}]" for e in range(3)]
    for k, path in enumerate(paths):
        state = load_file(str(path))
        for j, m in enumerate([state["head"]] + list(state["mlp.experts.down_proj"])):
            want = np.linalg.svd(m.double().numpy(), compute_uv=False)
            np.testing.assert_allclose(ws["sigma"].values[k, j, : want.size], want, rtol=1e-12)


def test_heads_beside_a_whole_tensor_named_with_brackets(tmp_path):
    """A 2-D tensor named adapters[0] beside the attention projections: heads=2 refused it as a matrix 'made
    from tensor adapters', which the model does not have."""
    from conftest import write_run

    sizes = {f"layers.0.attn.{p}_proj.weight": (8, 8) for p in "qkvo"} | {"adapters[0]": (8, 8)}
    write_run(tmp_path / "src", 3, sizes, seed=4)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    matrices = [str(m) for m in run.weight_spectra(heads=2)["matrix"].values]
    assert "adapters[0]" in matrices and "layers.0.attn.q_proj.weight[head 1]" in matrices
