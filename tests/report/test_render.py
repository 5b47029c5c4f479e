"""harness.report.render: the HTML page, the index, Markdown and CSV, and escaping of user strings."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.report.data import group_stats, load_ablations
from harness.report.render import (
    comparison_csv,
    comparison_markdown,
    render_ablation_html,
    report_filename,
    write_html_reports,
)
from harness.tracking import query

from .conftest import OOM, XSS, ReportStore

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture(scope="module")
def datas(report_store: ReportStore):
    return {d.name: d for d in load_ablations(query.open_store(report_store.uri))}


@pytest.fixture(scope="module")
def pages(datas, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reports")
    paths = write_html_reports(list(datas.values()), out)
    return {p.stem: p.read_text(encoding="utf-8") for p in paths}


def _no_external_references(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I)
    assert "@import" not in html and "<link rel=\"stylesheet\"" not in html
    assert "<iframe" not in html and "<img" not in html


def test_writes_a_page_per_ablation_and_an_index(pages) -> None:
    assert sorted(pages) == ["all_failed", "dcn_placement", "index", "no_baseline", "xss"]
    index = pages["index"]
    for name in ("all_failed", "dcn_placement", "no_baseline", "xss"):
        assert f'href="{name}.html"' in index
    assert 'href="index.html"' in pages["dcn_placement"]


def test_page_is_self_contained(pages) -> None:
    for html in pages.values():
        _no_external_references(html)
        assert len(re.findall(r"<script\b", html)) == 1  # the sorter, nothing else
        assert "<style>" in html


def test_placement_page_contents(pages, datas) -> None:
    html = pages["dcn_placement"]
    assert "Where do deformable layers help?" in html
    assert "17 finished" in html and "1 failed" in html and "1 still running" in html
    assert "0123456789ab" in html and "testhost" in html and "2.5.0" in html  # commit, host, torch version
    assert html.count("<svg") == 5  # curves, accuracy vs cost, scaling, op bars, accuracy vs FLOPs/params
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # ids of the four SVGs do not collide
    # comparison table: one row per group, the baseline marked, Δ with CI and method
    table = html[html.index('id="comparison-table"') : html.index("</table>", html.index('id="comparison-table"'))]
    assert table.count('<td class="grp"') == 6
    assert table.count('class="badge base">baseline') == 2
    row = group_stats(datas["dcn_placement"]).set_index("group").loc["deform_first2 · data.train_size=250"]
    delta = f"{row['delta_final/val/map']:+.3f}".replace("-", "−")
    ci = f"[{row['delta_final/val/map_low']:+.3f}, {row['delta_final/val/map_high']:+.3f}]".replace("-", "−")
    assert delta in table and ci in table
    assert "paired t" in html and "Welch" in html  # footnote says which test
    assert 'class="num best"' in table
    # failed run listed with its reason, running run marked
    failed = html[html.index('id="failed-table"') :]
    assert "deform_all/data.train_size=1000/seed=3" in failed and OOM in failed
    assert 'class="running"' in html and "deform_first2/data.train_size=250/seed=4" in html
    assert "1 running</span>" in table


def test_user_strings_are_escaped_everywhere(pages) -> None:
    html = pages["xss"]
    assert XSS not in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert html.count(ESCAPED) >= 4  # table, failed-run reason, failed-run name, legend text in SVGs ...
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert any(ESCAPED in svg for svg in svgs)  # matplotlib text, escaped
    assert all(XSS not in svg for svg in svgs)
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert "alert" not in script  # no user data in the JS
    assert XSS not in pages["index"] and "xss.html" in pages["index"]


def test_only_failed_runs_still_give_a_report(pages) -> None:
    html = pages["all_failed"]
    assert "all 2 runs of this ablation failed" in html
    assert html.count("FileNotFoundError: data/train.json") == 2
    assert "<svg" not in html and 'id="comparison-table"' not in html


def test_markdown_table(datas) -> None:
    md = comparison_markdown([datas["dcn_placement"], datas["xss"]])
    assert md.count("\n## ") + md.startswith("## ") == 2
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| group | n |"))
    assert "val mAP best on val (optimistic: chosen on the same data)" in header and "cost s/epoch" in header
    assert "Δ val mAP final \\[95% CI\\]" in header
    table = group_stats(datas["dcn_placement"]).set_index("group")
    comparison = lines[lines.index(header):]  # the evidence table comes first, then the comparison table
    row = next(line for line in comparison if line.startswith("| deform\\_all · data.train\\_size=1000 |"))
    r = table.loc["deform_all · data.train_size=1000"]
    assert f"| 2 | {r['best/val/map_mean']:.3f} ±{r['best/val/map_std']:.3f} |" in row
    assert "(paired t)" in row
    assert any(line.startswith("| conv · data.train\\_size=250 (baseline) |") for line in comparison)
    assert "\\<script\\>alert(1)\\</script\\>" in md and XSS not in md
    assert "paired t over the seeds" in md


def test_csv_table(datas) -> None:
    text = comparison_csv(list(datas.values()))
    frame = pd.read_csv(io.StringIO(text))
    assert set(frame["ablation"]) == {"dcn_placement", "xss", "no_baseline", "all_failed"}
    place = frame[frame.ablation == "dcn_placement"].set_index("group")
    table = group_stats(datas["dcn_placement"]).set_index("group")
    for group in table.index:
        for col in ("best/val/map_mean", "best/val/map_std", "cost/mean_epoch_time_s_mean"):
            assert place.loc[group, col] == pytest.approx(table.loc[group, col], rel=1e-5)
        assert place.loc[group, "delta_final/val/map_ci_low"] == pytest.approx(
            table.loc[group, "delta_final/val/map_low"], rel=1e-5, abs=1e-9
        )
    assert place.loc["deform_all · data.train_size=1000", "n_failed"] == 1
    assert place.loc["deform_all · data.train_size=1000", "delta_final/val/map_method"] == "paired t"
    assert XSS in set(frame["variant"])  # CSV carries the raw name; quoting is the CSV writer's job
    failed_only = frame[frame.ablation == "all_failed"]
    assert list(failed_only["n_finished"]) == [0] and list(failed_only["n_failed"]) == [2]


def test_report_filename_is_safe() -> None:
    taken: set[str] = set()
    assert report_filename("dcn placement", taken) == "dcn_placement.html"
    assert report_filename("dcn/placement", taken) == "dcn_placement-2.html"
    assert report_filename("../../etc", taken) == "etc.html"
    assert report_filename(XSS, taken) == "script_alert_1_script.html"
    assert report_filename("index", taken) == "index_ablation.html"


def test_single_page_has_no_index_link(datas, tmp_path: Path) -> None:
    (path,) = write_html_reports([datas["no_baseline"]], tmp_path)
    html = path.read_text()
    assert path.name == "no_baseline.html" and "index.html" not in html
    assert "No baseline declared" in html
    assert render_ablation_html(datas["no_baseline"]).count("<svg") >= 2
