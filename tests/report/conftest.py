"""Tiny synthetic run, sweep and analysis directories in the formats the report reads."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml


def make_run(root: Path, name: str = "glue-sst2", *, score: float = 0.8734, baseline: float | None = 0.5092,
             learned: bool | None = True, lr: float = 5e-4, r: int = 8, seed: int = 0, steps: int = 40,
             preset: str | None = None, table: str | None = None, metrics: bool = True) -> Path:
    run = root / f"20260101-000000-{name}-{seed:08d}"
    run.mkdir(parents=True)
    config: dict[str, Any] = {
        "experiment": "glue", "name": name, "out_dir": str(root),
        "model": {"name": "minilm-l6", "dtype": "float32"},
        "lora": {"r": r, "alpha": 2.0 * r, "target_modules": ["query", "value"]},
        "train": {"lr": lr, "max_steps": steps, "batch_size": 16, "seed": seed},
        "data": {"task": "sst2", "max_length": 64}, "generate": {"num_beams": 1},
    }
    if preset:
        config["preset"] = preset
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "env.json").write_text(json.dumps({"python": "3.11.7", "packages": {"torch": "2.13.0+cpu"},
                                              "device": "cpu", "torch_threads": 2}))
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "time": 0.1 * step, "train/loss": 0.7 * math.exp(-step / 15) + 0.05 * (seed + 1),
                      "train/lr": lr * min(1.0, step / 4), "train/tokens_per_s": 900.0 + 10 * (step % 5)})
        if step % 10 == 0:
            lines.append({"step": step, "time": 0.1 * step, "eval/accuracy": score * step / steps,
                          "eval/loss": 0.6 * math.exp(-step / 20)})
    if metrics:
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    results = {
        "experiment": "glue", "main_metric": "accuracy", "greater_is_better": True, "score": score,
        "baseline": None if baseline is None else {"score": baseline, "kind": "majority class",
                                                   "metrics": {"accuracy": baseline}},
        "margin": 0.01, "learned": learned, "metrics": {"accuracy": score, "loss": 0.3123},
        "params": {"trainable": 74_498, "total": 22_787_714}, "wall_seconds": 41.25, "tokens_per_second": 905.5,
        "details": {"table": table or "| task | r | accuracy |\n|---|---:|---:|\n| SST-2 | 8 | 87.3 |",
                    "paper": {"SST-2": {"LoRA (RoBERTa-base)": 95.1, "FT": 94.8}},
                    "peak_rss_mb": 812.5, "memory": {"weights_mb": 87.0, "adapter_mb": 0.3}},
    }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    return run


def make_sweep(root: Path, ranks: tuple[int, ...] = (1, 4, 16), lrs: tuple[float, ...] = (1e-4, 1e-3),
               seeds: tuple[int, ...] = (0, 1)) -> Path:
    """lora.r x train.lr over seeds; the r=1, lr=1e-4 point does not learn."""
    sweep_dir = root / "sweep"
    runs_root = sweep_dir / "runs"
    points = []
    for r in ranks:
        for lr in lrs:
            entries, scores, learned = [], [], []
            for seed in seeds:
                score = 0.5 + 0.05 * math.log2(r) + (0.1 if lr == 1e-3 else 0.0) + 0.01 * seed
                score = 0.505 if (r, lr, seed) == (1, 1e-4, 1) else round(score, 6)
                ok = score > 0.5092 + 0.01
                run = make_run(runs_root, f"sst2-r{r}-lr{lr:g}", score=score, learned=ok, lr=lr, r=r, seed=seed,
                               steps=12)
                entries.append(str(run.relative_to(sweep_dir)) if seed == 0 else str(run))
                scores.append(score)
                learned.append(ok)
            points.append({"overrides": {"lora.r": r, "train.lr": lr}, "runs": entries, "status": ["done"] * len(seeds),
                           "scores": scores, "baselines": [0.5092] * len(seeds), "learned": learned,
                           "score": statistics.median(scores), "spread": [min(scores), max(scores)],
                           "baseline": 0.5092})
    sweep = {"preset": "glue-cpu-sst2", "fixed": {"data.train_samples": 512},
             "grid": {"lora.r": list(ranks), "train.lr": list(lrs)}, "seeds": list(seeds), "main_metric": "accuracy",
             "greater_is_better": True, "points": points}
    (sweep_dir / "sweep.json").write_text(json.dumps(sweep, indent=2))
    (sweep_dir / "sweep.md").write_text("# sweep\n\n| lora.r | train.lr | accuracy |\n|---|---|---|\n| 1 | 0.0001 | 0.5 |\n")
    return sweep_dir


def make_analysis(root: Path, *, subspace: bool = True, delta_w: bool = True) -> Path:
    out = root / "analysis"
    out.mkdir(parents=True)
    if subspace:
        def phi(ra: int, rb: int, scale: float) -> list[list[float]]:
            return [[min(1.0, scale * (1 - 0.8 * (i + j) / (ra + rb))) for j in range(rb)] for i in range(ra)]

        modules = {f"model.layers.{k}.self_attn.{m}_proj": {"r_a": 4, "r_b": 12, "phi": phi(4, 12, 1.0 - 0.1 * k),
                                                             "random_phi": phi(4, 12, 0.15)}
                   for k in range(2) for m in ("q", "v")}
        (out / "subspace.json").write_text(json.dumps({"use": "A", "adapters": ["r4/adapter", "r12/adapter"],
                                                       "modules": modules}))
    if delta_w:
        mods = {f"model.layers.{k}.self_attn.q_proj": {"r": 4, "delta_norm": 2.5 + k, "proj_delta": 0.125 + 0.1 * k,
                                                      "proj_w_top": 12.0, "proj_random": 0.05, "w_norm": 30.0,
                                                      "amplification": (2.5 + k) / (0.125 + 0.1 * k)}
                for k in range(2)}
        (out / "delta_w.json").write_text(json.dumps({"modules": mods}))
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs")


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


@pytest.fixture
def analysis_dir(tmp_path: Path) -> Path:
    return make_analysis(tmp_path)


class Node:
    """One element of a parsed page: tag, attributes, its text (children's included)."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and (cls is None or cls in child.classes()):
                found.append(child)
            found += child.find_all(tag, cls)
        return found


VOID = {"meta", "img", "br", "hr", "link", "input"}


def parse_html(text: str) -> Node:
    """The page as a tree (stdlib html.parser); fails on a closing tag that does not match."""
    from html.parser import HTMLParser

    root = Node("#root", {}, None)

    class Parser(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.node = root

        def handle_starttag(self, tag: str, attrs: list) -> None:
            node = Node(tag, {k: v or "" for k, v in attrs}, self.node)
            self.node.children.append(node)
            if tag not in VOID:
                self.node = node

        def handle_endtag(self, tag: str) -> None:
            assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
            self.node = self.node.parent

        def handle_data(self, data: str) -> None:
            node = self.node
            while node is not None:
                node.parts.append(data)
                node = node.parent

    parser = Parser()
    parser.feed(text)
    parser.close()
    assert parser.node is root, f"<{parser.node.tag}> never closed"
    return root


def table_rows(table: Node) -> list[list[Node]]:
    return [row.find_all("td") for row in table.find_all("tr") if row.find_all("td")]
