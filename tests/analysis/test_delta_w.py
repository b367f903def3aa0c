"""ΔW = scaling·B A against W (Table 7) on matrices with known singular structure and an independent numpy
computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loralab.analysis.adapters import AnalysisError
from loralab.analysis.delta_w import run_delta_w

from .conftest import orthonormal, write_adapter, write_base

OUT, IN = 12, 20


def known(r: int = 3, sigma=(3.0, 2.0, 1.0), seed: int = 0):
    """B = P_r diag(σ), A = Q_r^T; W = P diag(w) Q[:, :OUT]^T with small w on ΔW's directions, large elsewhere."""
    p, q = orthonormal(OUT, OUT, seed), orthonormal(IN, IN, seed + 1)
    B = p[:, :r] @ torch.diag(torch.tensor(sigma, dtype=torch.float64))
    A = q[:, :r].T
    w = torch.tensor([0.5, 0.4, 0.3] + [10.0 - i for i in range(OUT - 3)], dtype=torch.float64)
    W = p @ torch.diag(w) @ q[:, :OUT].T
    return A, B, W, w


def numpy_table7(A, B, W, scaling, r):
    """Independent float64 numpy computation of the deterministic quantities."""
    A, B, W = (np.asarray(t, dtype=np.float64) for t in (A, B, W))
    dw = scaling * B @ A
    u, s, vt = np.linalg.svd(dw)
    pw, lw, qwt = np.linalg.svd(W)
    pd = np.linalg.norm(u[:, :r].T @ W @ vt[:r].T)
    return {"delta_norm": np.linalg.norm(dw), "proj_delta": pd, "proj_w_top": np.linalg.norm(pw[:, :r].T @ W @ qwt[:r].T),
            "w_norm": np.linalg.norm(W), "amplification": np.linalg.norm(dw) / pd, "delta_sv": s[:r]}


def run(tmp_path, factors, weights, cfg=None, **kw):
    a = write_adapter(tmp_path / "ad", factors, **(cfg or {}))
    b = write_base(tmp_path / "base", weights)
    return run_delta_w(a, b, tmp_path / "out", **kw)


def test_known_singular_values_non_square(tmp_path):
    A, B, W, w = known()
    res = run(tmp_path, {"model.layers.0.q_proj": (A, B)}, {"model.layers.0.q_proj.weight": W},
              {"r": 3, "lora_alpha": 6})  # scaling 2 -> ΔW singular values 6, 4, 2
    e = res["modules"]["model.layers.0.q_proj"]
    assert e["scaling"] == 2.0 and e["rank"] == 3 and e["rank_delta"] == 3 and e["transposed"] is False
    np.testing.assert_allclose(e["delta_sv"], [6, 4, 2], atol=1e-12)
    assert e["delta_norm"] == pytest.approx(math.sqrt(36 + 16 + 4), abs=1e-12)
    assert e["proj_delta"] == pytest.approx(math.sqrt(0.25 + 0.16 + 0.09), abs=1e-12)
    assert e["proj_w_top"] == pytest.approx(math.sqrt(100 + 81 + 64), abs=1e-12)
    assert e["w_norm"] == pytest.approx(float(torch.linalg.norm(w)), abs=1e-12)
    assert e["amplification"] == pytest.approx(math.sqrt(56 / 0.5), abs=1e-10)
    assert e["proj_delta"] < e["proj_random"] < e["proj_w_top"]
    on_disk = json.loads((tmp_path / "out" / "delta_w.json").read_text())
    assert on_disk["modules"]["model.layers.0.q_proj"]["delta_norm"] == e["delta_norm"]
    md = (tmp_path / "out" / "delta_w.md").read_text()
    assert "| `model.layers.0.q_proj` | 3 | 3 |" in md and "amplification" in md


def test_random_matrices_match_numpy(tmp_path):
    g = torch.Generator().manual_seed(3)
    A, B, W = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, IN), (OUT, 4), (OUT, IN)))
    res = run(tmp_path, {"x": (A, B)}, {"x.weight": W}, {"r": 4, "lora_alpha": 16}, n_random=0)
    e, ref = res["modules"]["x"], numpy_table7(A, B, W, 4.0, 4)
    for k in ("delta_norm", "proj_delta", "proj_w_top", "w_norm", "amplification"):
        assert e[k] == pytest.approx(float(ref[k]), rel=1e-12), k
    np.testing.assert_allclose(e["delta_sv"], ref["delta_sv"], rtol=1e-12)
    assert e["proj_random"] is None


def test_rank_deficient_and_zero_update(tmp_path):
    A, B, W, _ = known()
    B_def = B.clone()
    B_def[:, 2] = 0  # ΔW of rank 2 although r = 3
    res = run(tmp_path, {"d": (A, B_def), "z": (A, torch.zeros_like(B))}, {"d.weight": W, "z.weight": W},
              {"r": 3, "lora_alpha": 3})
    d, z = res["modules"]["d"], res["modules"]["z"]
    assert d["rank"] == 3 and d["rank_delta"] == 2
    assert d["proj_delta"] == pytest.approx(math.sqrt(0.25 + 0.16), abs=1e-12)  # only the 2 directions ΔW has
    assert d["proj_w_top"] == pytest.approx(math.sqrt(100 + 81), abs=1e-12)
    assert z["rank_delta"] == 0 and z["delta_norm"] == 0 and z["proj_delta"] == 0 and z["amplification"] is None
    assert z["proj_random"] == 0.0


def test_scaling_rslora_rank_and_alpha_patterns(tmp_path):
    g = torch.Generator().manual_seed(4)
    f = {"layers.0.q": (torch.randn(4, IN, generator=g), torch.randn(OUT, 4, generator=g)),
         "layers.0.v": (torch.randn(2, IN, generator=g), torch.randn(OUT, 2, generator=g)),
         "layers.1.q": (torch.randn(4, IN, generator=g), torch.randn(OUT, 4, generator=g))}
    weights = {f"{n}.weight": torch.randn(OUT, IN, generator=g) for n in f}
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v": 2}, "alpha_pattern": {r"layers\.1\..*": 3}}
    res = run(tmp_path, f, weights, cfg, n_random=1)["modules"]
    assert res["layers.0.q"]["scaling"] == pytest.approx(8 / 2)
    assert res["layers.0.v"]["scaling"] == pytest.approx(8 / math.sqrt(2)) and res["layers.0.v"]["rank"] == 2
    assert res["layers.1.q"]["scaling"] == pytest.approx(3 / 2)
    for n, (A, B) in f.items():
        ref = numpy_table7(A, B, weights[f"{n}.weight"], res[n]["scaling"], res[n]["rank"])
        assert res[n]["delta_norm"] == pytest.approx(float(ref["delta_norm"]), rel=1e-6)
    plain = run(tmp_path, f, weights, {**cfg, "use_rslora": False}, n_random=1)["modules"]
    assert plain["layers.0.v"]["scaling"] == pytest.approx(8 / 2) and plain["layers.1.q"]["scaling"] == pytest.approx(3 / 4)


def test_gpt2_conv1d_weight_is_transposed(tmp_path):
    A, B, W, _ = known()
    ref = run(tmp_path, {"transformer.h.0.attn.c_proj": (A, B)}, {"h.0.attn.c_proj.weight": W}, {"r": 3})
    conv = run(tmp_path, {"transformer.h.0.attn.c_proj": (A, B)}, {"h.0.attn.c_proj.weight": W.T},
               {"r": 3, "fan_in_fan_out": True})
    a, b = ref["modules"]["transformer.h.0.attn.c_proj"], conv["modules"]["transformer.h.0.attn.c_proj"]
    assert (a["transposed"], b["transposed"]) == (False, True) and b["w_key"] == "h.0.attn.c_proj.weight"
    for k in ("delta_norm", "proj_delta", "proj_w_top", "w_norm", "proj_random"):
        assert a[k] == pytest.approx(b[k], rel=1e-12)


def test_square_weight_orientation_follows_fan_in_fan_out(tmp_path):
    g = torch.Generator().manual_seed(5)
    A, B, W = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), torch.randn(8, 8, generator=g)
    ref = numpy_table7(A, B, W, 1.0, 2)
    lin = run(tmp_path, {"x": (A, B)}, {"x.weight": W}, {"r": 2, "lora_alpha": 2})["modules"]["x"]
    conv = run(tmp_path, {"x": (A, B)}, {"x.weight": W.T}, {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True})["modules"]["x"]
    assert not lin["transposed"] and conv["transposed"]
    assert lin["proj_delta"] == pytest.approx(float(ref["proj_delta"]), rel=1e-6)
    assert conv["proj_delta"] == pytest.approx(float(ref["proj_delta"]), rel=1e-6)


def test_fused_slice_uses_its_rows(tmp_path):
    g = torch.Generator().manual_seed(6)
    d = 4
    A, B = torch.randn(4, IN, generator=g, dtype=torch.float64), torch.randn(2 * d, 2, generator=g, dtype=torch.float64)
    W = torch.randn(3 * d, IN, generator=g, dtype=torch.float64)
    res = run(tmp_path, {"h.0.attn.c_attn": (A, B)}, {"h.0.attn.c_attn.weight": W.T},
              {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True, "loralab_fused_qkv": {"c_attn": [True, False, True]}})
    for name, rows, (ar, br) in (("h.0.attn.c_attn[0]", slice(0, d), (slice(0, 2), slice(0, d))),
                                 ("h.0.attn.c_attn[2]", slice(2 * d, 3 * d), (slice(2, 4), slice(d, 2 * d)))):
        ref = numpy_table7(A[ar], B[br], W[rows], 2.0, 2)
        for k in ("delta_norm", "proj_delta", "proj_w_top", "w_norm"):
            assert res["modules"][name][k] == pytest.approx(float(ref[k]), rel=1e-12), (name, k)


def test_prefix_mismatch_both_ways(tmp_path):
    A, B, W, _ = known()
    e = run(tmp_path, {"layers.0.q": (A, B)}, {"model.layers.0.q.weight": W, "model.layers.1.q.weight": W}, {"r": 3})
    assert e["modules"]["layers.0.q"]["w_key"] == "model.layers.0.q.weight"
    e = run(tmp_path, {"base_model.model.layers.0.q": (A, B)}, {"model.layers.0.q.weight": W}, {"r": 3})
    assert e["modules"]["base_model.model.layers.0.q"]["w_key"] == "model.layers.0.q.weight"


def test_random_projection_seeded(tmp_path):
    A, B, W, _ = known()
    args = ({"x": (A, B)}, {"x.weight": W}, {"r": 3})
    r0 = run(tmp_path, *args, n_random=7, seed=0)["modules"]["x"]["proj_random"]
    assert run(tmp_path, *args, n_random=7, seed=0)["modules"]["x"]["proj_random"] == r0
    assert run(tmp_path, *args, n_random=7, seed=1)["modules"]["x"]["proj_random"] != r0
    # E‖R1ᵀ W R2‖²_F = (k/out)(k/in)‖W‖²_F for Haar R1, R2: the mean norm is below that root, and of its order
    bound = math.sqrt(9 / (OUT * IN)) * float(torch.linalg.norm(W))
    assert 0.3 * bound < r0 < 1.3 * bound


def test_base_errors(tmp_path):
    A, B, W, _ = known()
    with pytest.raises(AnalysisError, match="no weight for module x"):
        run(tmp_path, {"x": (A, B)}, {"y.weight": W}, {"r": 3})
    with pytest.raises(AnalysisError, match=r"has shape \(5, 5\)"):
        run(tmp_path, {"x": (A, B)}, {"x.weight": torch.zeros(5, 5)}, {"r": 3})
    with pytest.raises(AnalysisError, match="quantized"):
        run(tmp_path, {"x": (A, B)}, {"x.weight": torch.zeros(OUT, IN, dtype=torch.uint8)}, {"r": 3})
    with pytest.raises(AnalysisError, match="several weights"):
        run(tmp_path, {"q": (A, B)}, {"a.q.weight": W, "b.q.weight": W}, {"r": 3})
    with pytest.raises(AnalysisError, match="DoRA"):
        run(tmp_path, {"x": (A, B)}, {"x.weight": W}, {"r": 3, "use_dora": True})
    with pytest.raises(AnalysisError, match="no \\*.safetensors"):
        run_delta_w(write_adapter(tmp_path / "ad", {"x": (A, B)}, r=3), tmp_path, tmp_path / "o")


def test_bf16_factors_keep_full_rank_and_match_numpy(tmp_path):
    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(8, 64, generator=g).bfloat16(), torch.randn(48, 8, generator=g).bfloat16()
    W = torch.randn(48, 64, generator=g).bfloat16()
    e = run(tmp_path, {"x": (A, B)}, {"x.weight": W}, {"r": 8, "lora_alpha": 16}, n_random=1)["modules"]["x"]
    assert e["rank_delta"] == 8
    ref = numpy_table7(A.double(), B.double(), W.double(), 2.0, 8)
    assert e["proj_delta"] == pytest.approx(float(ref["proj_delta"]), rel=1e-10)
    assert e["amplification"] == pytest.approx(float(ref["amplification"]), rel=1e-10)
