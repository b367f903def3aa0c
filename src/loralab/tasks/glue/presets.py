"""GLUE presets (``loralab train --preset NAME``), the GLUE experiment's ``presets``.

glue-paper-<task>
    The paper's RoBERTa-base LoRA recipe (Hu et al. 2021, Appendix D, Table 9): AdamW, linear decay
    after 6% warmup, r = alpha = 8 on W_q and W_v, max length 512, per-task batch / epochs / lr.
glue-cpu-<task>[-full|-bitfit]
    Sized for minutes on 2 CPU cores: MiniLM-L6 (22M), 2,000 training examples, max length 128, 3 epochs,
    dynamic padding with length grouping. The method picks the learning rate: full fine-tuning moves
    every weight and needs far less (5e-5) than LoRA (2e-3) or BitFit (1e-3). LoRA gets 4x the paper's
    5e-4 because 375 steps are not 30+ epochs: on STS-B, 3 epochs at 5e-4 reached Pearson 0.41, at
    2e-3 0.76 (MiniLM-L6, 2,000 examples, seed 0). SST-2 dev accuracy, seed 0: LoRA 82.6 (79.5 at
    5e-4), full 83.1, BitFit 77.2; on an idle 2-core box training took 47 s (LoRA), 47 s (BitFit) and
    93 s (full). Pair tasks (RTE, MRPC, STS-B) have 3-5x longer inputs: 75-250 s per run.
"""

from __future__ import annotations

TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")

PAPER_RECIPE: dict[str, tuple[int, int, float]] = {
    # task: (batch size, epochs, learning rate) for RoBERTa-base + LoRA
    "mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
    "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 5e-4), "stsb": (16, 40, 4e-4),
}

CPU_LR = {"lora": 2e-3, "full": 5e-5, "bitfit": 1e-3, "adapter_h": 1e-3, "adapter_l": 1e-3, "adapter_p": 1e-3,
          "prefix_layer": 1e-2, "prefix_embed": 3e-2, "ft_top2": 1e-4}
"""Learning rate per method for the short CPU runs (see the module docstring for how they were picked)."""
METHOD_KEYS: dict[str, dict] = {
    "lora": {"lora.r": 8, "lora.lora_alpha": 8.0, "lora.target_modules": ["query", "value"]},
    # Hu et al.'s adapter baselines at their smallest size: bottleneck r = 8
    "adapter_h": {"lora.r": 8}, "adapter_l": {"lora.r": 8}, "adapter_p": {"lora.r": 8},
    "prefix_layer": {"lora.prefix_length": 10}, "prefix_embed": {"lora.prefix_length": 10},
    "ft_top2": {"lora.top_layers": 2},
}
"""The method's own settings in the CPU presets (the rest are the schema's defaults)."""
CPU_TRAIN_SAMPLES = 2000
CPU_EVAL_SAMPLES = {"mnli": 2000, "qqp": 2000, "qnli": 2000}  # big dev sets: the first 2,000 (others: all)


def paper_preset(task: str) -> dict:
    batch, epochs, lr = PAPER_RECIPE[task]
    return {
        "_doc": f"{task.upper()}: the paper's RoBERTa-base LoRA recipe (GPU scale, needs roberta-base)",
        "experiment": "glue", "name": f"glue-paper-{task}", "model.name": "roberta-base", "data.task": task,
        "data.max_length": 512, "lora.method": "lora", "lora.r": 8, "lora.lora_alpha": 8.0,
        "lora.target_modules": ["query", "value"], "lora.modules_to_save": ["classifier"],
        "train.optimizer": "adamw", "train.lr": lr, "train.batch_size": batch, "train.epochs": float(epochs),
        "train.warmup_ratio": 0.06, "train.schedule": "linear", "train.keep_best": True,
    }


def cpu_preset(task: str, method: str = "lora") -> dict:
    suffix = "" if method == "lora" else f"-{method}"
    preset = {
        "_doc": f"{task.upper()}: {method} on MiniLM-L6, 2,000 examples, minutes on a CPU",
        "experiment": "glue", "name": f"glue-cpu-{task}{suffix}", "model.name": "minilm-l6", "data.task": task,
        "data.max_length": 128, "data.train_samples": CPU_TRAIN_SAMPLES,
        "data.eval_samples": CPU_EVAL_SAMPLES.get(task, 0), "lora.method": method,
        "train.lr": CPU_LR[method], "train.batch_size": 16, "train.epochs": 3.0, "train.warmup_ratio": 0.06,
        "train.schedule": "linear", "train.keep_best": True, "train.length_grouped": True,
    }
    preset.update(METHOD_KEYS.get(method, {}))
    if method == "lora":
        preset["lora.modules_to_save"] = ["classifier"]
    return preset


def mpnet_preset(task: str, method: str = "lora") -> dict:
    """The CPU recipe on MPNet-base (109M, about RoBERTa-base's size) in bf16 where the CPU has it."""
    suffix = "" if method == "lora" else f"-{method}"
    return {**cpu_preset(task, method), "_doc": f"{task.upper()}: {method} on MPNet-base, 2,000 examples, bf16 "
            "compute where the CPU has it", "name": f"glue-mpnet-{task}{suffix}", "model.name": "mpnet-base",
            "model.compute_dtype": "auto"}


def all_presets() -> dict[str, dict]:
    presets = {}
    for task in TASKS:
        presets[f"glue-paper-{task}"] = paper_preset(task)
        for method in CPU_LR:
            for preset in (cpu_preset(task, method), mpnet_preset(task, method)):
                presets[preset["name"]] = preset
    return presets


PAPER_MNLI_RANK = {"1": 91.3, "2": 91.4, "4": 91.3, "8": 91.6, "64": 91.4}
"""Hu et al. 2021, Table 6 (arXiv v2): GPT-3 175B + LoRA on W_q, W_v, MultiNLI-matched validation accuracy by
rank r (±0.1%). The paper's only GLUE-task rank sweep."""
GLUE_RANKS = (1, 2, 4, 8, 16, 64)


def all_sweeps() -> dict[str, dict]:
    """Named sweeps: ``loralab sweep --sweep glue-rank-<task> --out DIR`` (MiniLM-L6 CPU presets, 3 seeds)."""
    return {f"glue-rank-{task}": {
        "_doc": f"LoRA rank sweep r = 1..64 on {task.upper()} (MiniLM-L6, the glue-cpu preset), 3 seeds",
        "preset": f"glue-cpu-{task}", "grid": {"lora.r": list(GLUE_RANKS)}, "seeds": [0, 1, 2],
        "reference": {"label": "Hu et al. 2021 Table 6 (GPT-3 175B, MNLI-m, W_q and W_v)", "key": "lora.r",
                      "metrics": {"accuracy": 100.0},
                      "rows": {r: {"accuracy": acc} for r, acc in PAPER_MNLI_RANK.items()},
                      "note": "Another model and task (the paper has no GLUE rank sweep on RoBERTa): the "
                              "flatness over r is what compares. r = 16 has no paper row."}}
        for task in ("sst2", "rte", "mrpc")}
