"""`loralab report` on tiny synthetic dirs: page structure, every plot present and decodable, the
numbers on the page equal to the JSON's, no network references."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report draws with matplotlib (pip install matplotlib)")

from loralab.report.commands import main
from loralab.report.html import fmt

from .conftest import make_analysis, make_run, make_sweep, parse_html, table_rows


def _report(capsys, out: Path, *paths: Path, extra: tuple[str, ...] = (), **kw) -> Path:
    assert main([*map(str, paths), "--out", str(out), *extra], **kw) == 0, capsys.readouterr().err
    assert str(out / "index.html") in capsys.readouterr().out
    return out


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    a = make_run(root / "runs", "alpha")
    b = make_run(root / "runs", "beta", score=0.507, learned=False, lr=1e-3, seed=1)
    sweep, analysis = make_sweep(root), make_analysis(root)
    (analysis / "phi_q.png").write_bytes(_tiny_png())
    out = {}
    for name, paths in (("run", [a]), ("compare", [a, b]), ("sweep", [sweep]), ("analysis", [analysis])):
        assert main([*map(str, paths), "--out", str(root / f"out-{name}")]) == 0
        out[name] = root / f"out-{name}"
    out.update(run_dir=a, bad_dir=b, sweep_dir=sweep, analysis_dir=analysis)
    return out


def _tiny_png() -> bytes:
    import io

    import numpy as np
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.random.default_rng(0).random((16, 16)), format="png")
    return buf.getvalue()


def _page(out: Path):
    return parse_html((out / "index.html").read_text(encoding="utf-8"))


def _check_assets(out: Path) -> list[str]:
    """Every img decodes, every link resolves, nothing points off the machine; returns the PNG stems."""
    from matplotlib.image import imread

    text = (out / "index.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    doc = parse_html(text)
    ids = {n.attrs["id"] for n in doc.find_all() if "id" in n.attrs}
    stems = []
    for img in doc.find_all("img"):
        src = img.attrs["src"]
        assert not re.match(r"^[a-z]+:|^//|^/", src), src
        pixels = imread(out / src)
        assert pixels.shape[0] > 10 and pixels.shape[1] > 10 and pixels.std() > 0, src
        stems.append(Path(src).stem)
    for a in doc.find_all("a"):
        href = a.attrs["href"]
        if href.startswith("#"):
            assert href[1:] in ids, href
        else:
            assert not re.match(r"^[a-z]+:|^//|^/", href) and (out / href).is_file(), href
            if href.endswith(".svg"):
                assert ET.parse(out / href).getroot().tag == "{http://www.w3.org/2000/svg}svg"
                refs = set(re.findall(r"https?://[^\"' )]+", (out / href).read_text(encoding="utf-8")))
                assert refs <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, refs
    for png in out.glob("*.png"):
        if not png.name.startswith("orig-"):
            assert png.with_suffix(".svg").is_file(), png
    return stems


def _nums(doc, cls: str) -> list[tuple[float, str]]:
    return [(json.loads(n.attrs["data-value"]), n.text) for n in doc.find_all("span", cls)]


def test_run_page_structure_plots_and_numbers(pages):
    out, run = pages["run"], pages["run_dir"]
    results = json.loads((run / "results.json").read_text())
    doc = _page(out)
    assert [s.attrs["id"] for s in doc.find_all("section")] == ["result", "curves", "tables", "config"]
    assert set(_check_assets(out)) == {"loss", "lr", "eval", "throughput", "memory"}
    verdict = doc.find_all("div", "verdict")[0]
    assert verdict.attrs["data-learned"] == "true" and "ok" in verdict.classes() and "Learned" in verdict.text
    assert (results["score"], fmt(results["score"])) in _nums(verdict, "score")
    assert _nums(verdict, "baseline") == [(results["baseline"]["score"], fmt(results["baseline"]["score"]))]
    cards = {c.find_all("div", "k")[0].text: json.loads(c.find_all("span")[0].attrs["data-value"])
             for c in doc.find_all("div", "card")}
    assert cards["accuracy"] == results["score"] and cards["baseline (majority class)"] == results["baseline"]["score"]
    assert cards["tokens/s"] == results["tokens_per_second"]
    assert cards["peak RSS (MB)"] == results["details"]["peak_rss_mb"]
    metrics = {r[0].text: json.loads(r[1].find_all("span")[0].attrs["data-value"])
               for r in table_rows(doc.find_all("table", "metrics")[0])}
    assert metrics == results["metrics"]


def test_run_page_renders_the_experiment_table_beside_the_papers(pages):
    doc = _page(pages["run"])
    ours, paper = doc.find_all("div", "ours")[0], doc.find_all("div", "paper")[0]
    md = ours.find_all("table", "md")[0]
    assert [th.text for th in md.find_all("th")] == ["task", "r", "accuracy"]
    assert [[c.text for c in r] for r in table_rows(md)] == [["SST-2", "8", "87.3"]]
    assert [[c.text for c in r] for r in table_rows(paper.find_all("table")[0])] == [["SST-2", "95.1", "94.8"]]


def test_a_run_that_did_not_learn_is_flagged(pages, capsys, tmp_path):
    verdict = _page(pages["compare"]).find_all("div", "verdict")
    flagged = [v for v in verdict if v.attrs["data-learned"] == "false"]
    assert len(flagged) == 1 and "bad" in flagged[0].classes() and "Did not learn" in flagged[0].text
    none = make_run(tmp_path / "runs", "nobase", baseline=None, learned=None, metrics=False)
    doc = _page(_report(capsys, tmp_path / "o", none))
    v = doc.find_all("div", "verdict")[0]
    assert v.attrs["data-learned"] == "null" and "unknown" in v.classes() and "no baseline" in v.text


def test_compare_overlays_curves_and_lists_config_differences(pages):
    out = pages["compare"]
    doc = _page(out)
    stems = set(_check_assets(out))
    assert {"compare-overlay-loss", "compare-overlay-lr", "compare-overlay-eval", "compare-bars-memory"} <= stems
    assert {"run1-loss", "run2-loss"} <= stems
    diff = {r[0].text: [c.text for c in r[1:]] for r in table_rows(doc.find_all("table", "config-diff")[0])}
    assert diff == {"name": ["alpha", "beta"], "train.lr": ["0.0005", "0.001"], "train.seed": ["0", "1"]}
    marks = [n.attrs["data-learned"] for n in doc.find_all("table", "runs")[0].find_all("span", "mark")]
    assert marks == ["true", "false"]


def test_sweep_page_plots_each_key_and_tables_the_points(pages):
    out = pages["sweep"]
    sweep = json.loads((pages["sweep_dir"] / "sweep.json").read_text())
    doc = _page(out)
    stems = set(_check_assets(out))
    assert {"sweep-0", "sweep-1", "sweep-runs-loss"} <= stems
    rows = table_rows(doc.find_all("table", "points")[0])
    assert len(rows) == len(sweep["points"])
    for row, point in zip(rows, sweep["points"]):
        assert [json.loads(c.find_all("span")[0].attrs["data-value"]) for c in row[:2]] == list(point["overrides"].values())
        assert json.loads(row[2].find_all("span")[0].attrs["data-value"]) == point["score"]
        assert json.loads(row[4].find_all("span")[0].attrs["data-value"]) == point["baseline"]
        expected = "false" if False in point["learned"] else "true"
        assert row[5].find_all("span", "mark")[0].attrs["data-learned"] == expected
    verdict = doc.find_all("div", "verdict")[0]
    assert "5 learned, 1 did not learn" in verdict.text and "bad" in verdict.classes()


def test_sweep_panel_one_line_per_other_value_with_spread_and_baseline(pages):
    from loralab.report.page_sweep import sweep_panel

    sweep = json.loads((pages["sweep_dir"] / "sweep.json").read_text())
    panel = sweep_panel(sweep, "lora.r")
    assert [s.label for s in panel.series] == ["lr=0.0001", "lr=0.001"]
    first = sweep["points"][0]
    assert panel.series[0].x == [1, 4, 16] and panel.series[0].y[0] == first["score"]
    assert (panel.series[0].lo[0], panel.series[0].hi[0]) == tuple(first["spread"])
    assert panel.hlines == [(0.5092, "baseline")] and panel.logx


def test_analysis_page_heatmaps_and_delta_w_table(pages):
    out = pages["analysis"]
    doc = _page(out)
    sub = json.loads((pages["analysis_dir"] / "subspace.json").read_text())
    dw = json.loads((pages["analysis_dir"] / "delta_w.json").read_text())
    stems = _check_assets(out)
    assert len([s for s in stems if s.startswith("phi-")]) == len(sub["modules"])
    assert "amplification" in stems and "orig-phi_q" in stems
    rows = table_rows(doc.find_all("table", "delta-w")[0])
    got = {r[0].text: [json.loads(c.find_all("span")[0].attrs["data-value"]) for c in r[1:]] for r in rows}
    cols = ("r", "delta_norm", "proj_delta", "proj_w_top", "proj_random", "w_norm", "amplification")
    assert got == {name: [m[c] for c in cols] for name, m in dw["modules"].items()}


def test_preset_diff_from_the_callers_presets_and_from_preset_json(capsys, tmp_path):
    run = make_run(tmp_path / "runs", "p", preset="glue-sst2", metrics=False)
    presets = {"glue-sst2": {"train.lr": 1e-3, "lora": {"r": 8}, "data.task": "sst2"}}
    doc = _page(_report(capsys, tmp_path / "o1", run, presets=presets))
    rows = [[c.text for c in r] for r in table_rows(doc.find_all("table", "diff")[0])]
    assert rows == [["train.lr", "0.001", "0.0005"]]
    (run / "preset.json").write_text(json.dumps({"name": "mine", "overrides": {"lora.r": 4}}))
    doc = _page(_report(capsys, tmp_path / "o2", run))
    assert [[c.text for c in r] for r in table_rows(doc.find_all("table", "diff")[0])] == [["lora.r", "4", "8"]]


def test_embed_puts_the_pngs_in_the_page(capsys, tmp_path, run_dir):
    import base64

    doc = _page(_report(capsys, tmp_path / "o", run_dir, extra=("--embed",)))
    srcs = [img.attrs["src"] for img in doc.find_all("img")]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_truncated_metrics_line_is_a_warning_not_a_failure(capsys, tmp_path, run_dir):
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "train/lo')
    doc = _page(_report(capsys, tmp_path / "o", run_dir))
    assert any("skipped 1 unreadable line" in w.text for w in doc.find_all("p", "warn"))


def test_a_run_without_results_is_reported_as_unfinished(capsys, tmp_path, run_dir):
    (run_dir / "results.json").unlink()
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "error.txt").write_text("RuntimeError: loss is nan")
    doc = _page(_report(capsys, tmp_path / "o", run_dir))
    v = doc.find_all("div", "verdict")[0]
    assert v.attrs["data-learned"] == "missing" and "failed" in v.text
    assert "loss is nan" in doc.text
