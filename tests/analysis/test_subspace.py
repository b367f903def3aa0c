"""φ(i, j) (Hu et al. 2021 Eq. 4) against bases built by construction and a brute-force numpy φ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loralab.analysis.adapters import AnalysisError
from loralab.analysis.subspace import phi_grid, run_subspace

from .conftest import orthonormal, write_adapter

D = 20  # in_features
OUT = 12  # out_features


def brute_phi(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """φ by its definition, one (i, j) at a time."""
    r1, r2 = u1.shape[1], u2.shape[1]
    out = np.zeros((r1, r2))
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            out[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
    return out


def a_from(basis: torch.Tensor, sv: list[float]) -> torch.Tensor:
    """lora_A (r x in) whose right-singular vectors are basis' columns, with singular values sv (decreasing)."""
    return torch.diag(torch.tensor(sv, dtype=torch.float64)) @ basis.T


def rand_b(r: int, seed: int) -> torch.Tensor:
    return torch.randn(OUT, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(tmp_path, fa, fb, cfg_a=None, cfg_b=None, **kw):
    a = write_adapter(tmp_path / "a", fa, **(cfg_a or {}))
    b = write_adapter(tmp_path / "b", fb, **(cfg_b or {}))
    kw.setdefault("plots", False)
    return run_subspace(a, b, tmp_path / "out", **kw)


def test_planted_shared_subspace_pattern(tmp_path):
    """k = 2 shared leading directions, everything else orthogonal: φ(i, j) = min(i, j, k) / min(i, j)."""
    e = orthonormal(D, D, 0)
    A1 = a_from(e[:, :4], [5, 4, 3, 2])
    A2 = a_from(torch.cat([e[:, :2], e[:, 4:8]], 1), [6, 5, 4, 3, 2, 1])
    res = run(tmp_path, {"m.q": (A1, rand_b(4, 1))}, {"m.q": (A2, rand_b(6, 2))}, {"r": 4}, {"r": 6})
    e_ = res["modules"]["m.q"]
    assert (e_["r_a"], e_["r_b"], e_["rank_a"], e_["rank_b"]) == (4, 6, 4, 6)
    phi = np.array(e_["phi"])
    assert phi.shape == (4, 6)
    expect = np.array([[min(i, j, 2) / min(i, j) for j in range(1, 7)] for i in range(1, 5)])
    np.testing.assert_allclose(phi, expect, atol=1e-12)
    assert np.all(phi[:2, :2] == pytest.approx(1.0))
    on_disk = json.loads((tmp_path / "out" / "subspace.json").read_text())
    assert on_disk["use"] == "A" and on_disk["adapters"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    np.testing.assert_allclose(np.array(on_disk["modules"]["m.q"]["phi"]), expect, atol=1e-12)


def test_shared_directions_out_of_order_and_rotated(tmp_path):
    """A2's singular vectors mix A1's (a rotation): φ equals the brute-force definition on the planted bases."""
    e = orthonormal(D, D, 3)
    u1 = e[:, :5]
    c, s = np.cos(0.6), np.sin(0.6)
    mix = torch.stack([c * e[:, 6] + s * e[:, 1], e[:, 7], -s * e[:, 6] + c * e[:, 1], e[:, 3], e[:, 9],
                       e[:, 0], e[:, 10]], 1)
    A1, A2 = a_from(u1, [9, 7, 5, 3, 1]), a_from(mix, [13, 11, 8, 6, 4, 2, 1])
    res = run(tmp_path, {"x": (A1, rand_b(5, 1))}, {"x": (A2, rand_b(7, 2))}, {"r": 5}, {"r": 7})
    np.testing.assert_allclose(np.array(res["modules"]["x"]["phi"]), brute_phi(u1.numpy(), mix.numpy()),
                               atol=1e-12)
    # φ(1, 1): e_0 vs (c e_6 + s e_1) is 0; φ(2, 1): span{e_0, e_1} vs that: s^2
    assert res["modules"]["x"]["phi"][1][0] == pytest.approx(s * s, abs=1e-12)


def test_phi_grid_matches_brute_force_random():
    u1, u2 = orthonormal(30, 6, 1), orthonormal(30, 9, 2)
    np.testing.assert_allclose(phi_grid(u1, u2).numpy(), brute_phi(u1.numpy(), u2.numpy()), atol=1e-12)


def test_same_adapter_is_one_on_the_diagonal_block(tmp_path):
    A = torch.randn(8, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = run(tmp_path, {"x": (A, rand_b(8, 1))}, {"x": (A, rand_b(8, 2))})
    phi = np.array(res["modules"]["x"]["phi"])
    np.testing.assert_allclose(np.diag(phi), 1.0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("extra", ["zeros", "combinations"])
def test_rank_deficient_rows_are_null(tmp_path, dtype, extra):
    """A1 of rank 2 with r = 4: rows i > 2 are undetermined (null); row 2 (the whole row space) is exact, and
    row 1 too when the extra rows are zero (the top direction is then e_0)."""
    e = orthonormal(D, D, 4)
    A1 = a_from(e[:, :2], [3, 2])
    more = torch.zeros(2, D, dtype=torch.float64) if extra == "zeros" else torch.stack([A1[0] + 2 * A1[1], A1[0] - A1[1]])
    A1 = torch.cat([A1, more]).to(dtype)
    u2 = torch.cat([e[:, 1:2], e[:, 5:8]], 1)
    A2 = a_from(u2, [4, 3, 2, 1]).to(dtype)
    res = run(tmp_path, {"x": (A1, rand_b(4, 1).to(dtype))}, {"x": (A2, rand_b(4, 2).to(dtype))}, {"r": 4}, {"r": 4})
    e_ = res["modules"]["x"]
    assert (e_["rank_a"], e_["rank_b"]) == (2, 4)
    assert all(v is None for row in e_["phi"][2:] for v in row)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    expect = brute_phi(e[:, :2].numpy(), u2.numpy())
    first = 0 if extra == "zeros" else 1
    np.testing.assert_allclose(np.array(e_["phi"][first:2], dtype=float), expect[first:2], atol=tol)
    assert len(e_["random_phi"]) == 4 and None not in e_["random_phi"][3]


def test_use_B_uses_left_singular_vectors_of_B(tmp_path):
    f = orthonormal(OUT, OUT, 6)
    B1 = f[:, :3] @ torch.diag(torch.tensor([3.0, 2, 1], dtype=torch.float64))
    B2 = torch.cat([f[:, :1], f[:, 5:8]], 1) @ torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    A1 = torch.randn(3, D, dtype=torch.float64)
    A2 = torch.randn(4, D, dtype=torch.float64)
    res = run(tmp_path, {"x": (A1, B1)}, {"x": (A2, B2)}, {"r": 3}, {"r": 4}, use="B")
    expect = np.array([[min(i, j, 1) / min(i, j) for j in range(1, 5)] for i in range(1, 4)])
    np.testing.assert_allclose(np.array(res["modules"]["x"]["phi"]), expect, atol=1e-12)
    assert res["use"] == "B"
    # an untrained adapter (B = 0) has no B subspace at all
    res0 = run(tmp_path, {"x": (A1, torch.zeros(OUT, 3))}, {"x": (A2, B2)}, {"r": 3}, {"r": 4}, use="B")
    assert res0["modules"]["x"]["rank_a"] == 0 and all(v is None for row in res0["modules"]["x"]["phi"] for v in row)


def test_random_baseline_shapes_seed_and_filter_independence(tmp_path):
    g = torch.Generator().manual_seed(0)
    fa = {f"l.{i}.q": (torch.randn(4, 200, generator=g), torch.randn(OUT, 4, generator=g)) for i in range(2)}
    fb = {f"l.{i}.q": (torch.randn(16, 200, generator=g), torch.randn(OUT, 16, generator=g)) for i in range(2)}
    r1 = run(tmp_path, fa, fb, {"r": 4}, {"r": 16}, seed=0)
    r2 = run(tmp_path, fa, fb, {"r": 4}, {"r": 16}, seed=0)
    r3 = run(tmp_path, fa, fb, {"r": 4}, {"r": 16}, seed=1)
    one = run(tmp_path, fa, fb, {"r": 4}, {"r": 16}, seed=0, modules=r"^l\.1\.")
    rp = np.array(r1["modules"]["l.0.q"]["random_phi"])
    assert rp.shape == (4, 16) and np.all((rp >= 0) & (rp <= 1 + 1e-12))
    assert r1["modules"] == r2["modules"]
    assert r3["modules"]["l.0.q"]["random_phi"] != r1["modules"]["l.0.q"]["random_phi"]
    assert r1["modules"]["l.0.q"]["random_phi"] != r1["modules"]["l.1.q"]["random_phi"]
    assert list(one["modules"]) == ["l.1.q"] and one["modules"]["l.1.q"] == r1["modules"]["l.1.q"]
    assert rp[3, 15] < 0.2  # 4 random directions in 200 dims barely meet 16 others (E ≈ 16/200)


def test_fused_slices_are_separate_modules(tmp_path):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, D, generator=g)  # 2 enabled slices of rank 2
    B = torch.randn(2 * 5, 2, generator=g)  # d = 5 rows per slice
    cfg = {"r": 2, "loralab_fused_qkv": {"c_attn": [True, False, True]}}
    res = run(tmp_path, {"h.0.attn.c_attn": (A, B)}, {"h.0.attn.c_attn": (A.flip(0), B)}, cfg, cfg)
    assert sorted(res["modules"]) == ["h.0.attn.c_attn[0]", "h.0.attn.c_attn[2]"]
    assert res["modules"]["h.0.attn.c_attn[0]"]["r_a"] == 2
    # b's slice 0 holds a's slice-2 rows (reversed: same right-singular vectors) and vice versa
    v = [np.linalg.svd(A[rows].double().numpy())[2][:2].T for rows in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(np.array(res["modules"]["h.0.attn.c_attn[0]"]["phi"]), brute_phi(v[0], v[1]), atol=1e-9)
    np.testing.assert_allclose(np.array(res["modules"]["h.0.attn.c_attn[2]"]["phi"]), brute_phi(v[1], v[0]), atol=1e-9)


def test_mismatched_in_features_and_no_common_modules(tmp_path):
    with pytest.raises(AnalysisError, match="in_features"):
        run(tmp_path, {"x": (torch.randn(8, D), torch.randn(OUT, 8))}, {"x": (torch.randn(8, D + 1), torch.randn(OUT, 8))})
    with pytest.raises(AnalysisError, match="no module is adapted in both"):
        run(tmp_path, {"x": (torch.randn(8, D), torch.randn(OUT, 8))}, {"y": (torch.randn(8, D), torch.randn(OUT, 8))})
    with pytest.raises(AnalysisError, match="not a valid regular expression"):
        run(tmp_path, {"x": (torch.randn(8, D), torch.randn(OUT, 8))}, {"x": (torch.randn(8, D), torch.randn(OUT, 8))},
            modules="(")
    with pytest.raises(AnalysisError, match="rank r=4"):
        run(tmp_path, {"x": (torch.randn(8, D), torch.randn(OUT, 8))}, {"x": (torch.randn(8, D), torch.randn(OUT, 8))},
            {"r": 4})
    with pytest.raises(AnalysisError, match="use must be"):
        run(tmp_path, {"x": (torch.randn(8, D), torch.randn(OUT, 8))}, {"x": (torch.randn(8, D), torch.randn(OUT, 8))},
            use="C")


def test_heatmaps_and_per_layer_plot_decode(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    g = torch.Generator().manual_seed(2)
    fa = {f"model.layers.{i}.self_attn.{m}": (torch.randn(2, D, generator=g), torch.randn(OUT, 2, generator=g))
          for i in range(3) for m in ("q_proj", "v_proj")}
    fa["model.layers.0.self_attn.q_proj"] = (torch.cat([torch.randn(1, D, generator=g), torch.zeros(1, D)]),
                                             torch.randn(OUT, 2, generator=g))  # a null row in the grid
    fb = {n: (torch.randn(8, D, generator=g), torch.randn(OUT, 8, generator=g)) for n in fa}
    run(tmp_path, fa, fb, {"r": 2}, {"r": 8}, plots=True)
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert "per_layer.png" in pngs and "phi_model.layers.2.self_attn.v_proj.png" in pngs and len(pngs) == 7
    for p in (tmp_path / "out").glob("*.png"):
        assert p.stat().st_size > 1000
        img = image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_no_layer_index_means_no_per_layer_plot(tmp_path):
    pytest.importorskip("matplotlib")
    run(tmp_path, {"q": (torch.randn(8, D), torch.randn(OUT, 8))}, {"q": (torch.randn(8, D), torch.randn(OUT, 8))},
        plots=True)
    assert not (tmp_path / "out" / "per_layer.png").exists() and (tmp_path / "out" / "phi_q.png").exists()


def test_rank_above_dimension_and_low_precision_storage(tmp_path):
    """r = 24 > in = 20: only 20 directions exist (rows 21-24 null, random baseline too); bf16 factors of
    full rank are not mistaken for rank-deficient, and a bf16 zero row is."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(24, D, generator=g)
    res = run(tmp_path, {"x": (big, torch.randn(OUT, 24, generator=g))},
              {"x": (torch.randn(8, D, generator=g), torch.randn(OUT, 8, generator=g))}, {"r": 24}, {"r": 8})
    e = res["modules"]["x"]
    assert e["rank_a"] == D and len(e["phi"]) == 24 and all(v is None for row in e["phi"][D:] for v in row)
    assert e["phi"][D - 1][7] == pytest.approx(1.0)  # all of R^20 contains the other 8 directions
    assert all(v is None for row in e["random_phi"][D:] for v in row) and e["random_phi"][D - 1][0] is not None
    a16 = torch.randn(8, 200, generator=g).bfloat16()
    a16z = a16.clone()
    a16z[7] = 0
    res = run(tmp_path, {"y": (a16, torch.randn(OUT, 8, generator=g).bfloat16())},
              {"y": (a16z, torch.randn(OUT, 8, generator=g).bfloat16())})
    assert (res["modules"]["y"]["rank_a"], res["modules"]["y"]["rank_b"]) == (8, 7)
    assert res["skipped"] == {}


def test_conv_and_embedding_modules_are_skipped_and_listed(tmp_path):
    g = torch.Generator().manual_seed(8)
    fa = {"x": (torch.randn(8, D, generator=g), torch.randn(OUT, 8, generator=g)),
          "conv": (torch.randn(8, 3, 3, 3, generator=g), torch.randn(OUT, 8, 1, 1, generator=g))}
    res = run(tmp_path, fa, fa)
    assert list(res["modules"]) == ["x"] and "convolution" in res["skipped"]["conv"]
