"""Tables over finished runs (GLUE, E2E): the runs collected from a root, and the .md/.json written.

No torch here: the table commands only read results.json and config.yaml files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def collect_results(root: str | Path, experiment: str, flatten: Callable[[dict, Path], dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """Finished training runs of ``experiment`` under ``root``, each as ``flatten(results, run_dir)``: from
    the run registry (``<root>/runs.sqlite``, completed runs) when there is one, else every
    ``results.json`` below ``root``. Evaluation-only runs (``loralab eval``: no fit) are left out, so
    re-evaluating an adapter never counts as another seed."""
    from loralab.engine.runs import REGISTRY, list_runs

    root = Path(root)
    if (root / REGISTRY).is_file():
        paths = [record.dir / "results.json" for record in list_runs(root)
                 if record.experiment == experiment and record.status == "completed"]
    else:
        paths = sorted(root.rglob("results.json"))
    found = []
    for path in paths:
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("experiment") == experiment:
                found.append(flatten(result, path.parent))
    return [r for r in found if r.get("fit") is not None]


def write_table_files(markdown: str, data: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Print ``markdown`` and write it to ``<out_dir>/<stem>.md``, ``data`` to ``<stem>.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(data, indent=2))
    print(markdown)
    return md_path, json_path
