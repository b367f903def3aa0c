"""Analyses of trained LoRA adapters, after Hu et al. 2021 §7 (all linear algebra in float64).

* :mod:`loralab.analysis.subspace` — the normalized subspace similarity
  φ(A_1, A_2, i, j) = ‖U_1^{i⊤} U_2^{j}‖²_F / min(i, j) between two adapters (Eq. 4, Fig. 3/4/6/7), with a
  random-Gaussian baseline of the same shapes.
* :mod:`loralab.analysis.delta_w` — ΔW = scaling·B A against the frozen W (Table 7): ‖ΔW‖_F, ‖U_r^⊤ W V_r‖_F
  for ΔW's, W's own and random top-r subspaces, ‖W‖_F and the amplification factor.
* :mod:`loralab.analysis.plots` — the figures (matplotlib, imported lazily, Agg canvas).
* :mod:`loralab.analysis.sweeps` — both on the adapters of a rank sweep (rank pair, seed pair, ΔW at two
  ranks), and score-against-rank curves with saturation ranks across sweeps.
* :mod:`loralab.analysis.commands` — ``loralab analyze subspace|delta-w|sweep|ranks``.

Adapters are read from PEFT-format directories (``adapter_config.json`` + ``adapter_model.safetensors``);
nothing here imports transformers or the training engine.
"""
