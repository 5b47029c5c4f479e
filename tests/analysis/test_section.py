"""`analysis_section`: valid, self-contained HTML from MLflow alone, with user strings escaped."""

from __future__ import annotations

import io
from html.parser import HTMLParser

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from harness.analysis.section import analysis_section
from harness.tracking import query

XSS = "<script>alert(1)</script>"
VOID = {"img", "br", "meta", "hr", "input", "link"}


class Balanced(HTMLParser):
    """Checks that every element is closed in order (SVG included); records <img> sources."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(html: str) -> Balanced:
    parser = Balanced()
    parser.feed(html)
    parser.close()
    assert not parser.errors, parser.errors[:3]
    assert not parser.stack, parser.stack
    return parser


def test_section_from_a_real_ablation(trained):
    store = query.open_store(trained.uri)
    exp = MlflowClient(trained.uri).get_experiment_by_name(trained.experiment)
    runs = query.search_runs(store, [exp.experiment_id])
    html = analysis_section(runs, store)
    parsed = parse(html)
    assert html.startswith('<section class="dcn-analysis"') and html.rstrip().endswith("</section>")
    assert {"svg", "table", "img"} <= parsed.tags
    assert len(parsed.images) == 2  # the sampling figures of the two deformable groups
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    for text in ("Robustness to geometric transforms", "What each offset layout can express",
                 "Offset statistics per deformable layer", "Sampling locations", "Effective receptive fields",
                 "shared (2)", "per-tap (2·k·k)", "conv0", "conv1"):
        assert text in html, text
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script" not in html
    # only run ids are taken from the table: a bare run_id column gives the same section
    again = analysis_section(pd.DataFrame({"run_id": runs["run_id"]}), trained.uri)
    assert again.count("<tr>") == html.count("<tr>")


def test_user_strings_are_escaped(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("xss", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp, run_name=f"{XSS}/seed=0", tags={
        "harness.role": "child", "harness.variant": XSS, "harness.group": f"{XSS} & co", "harness.seed": "0",
        "harness.analysis": "{}"})
    rid = run.info.run_id
    for key, value in {"model.deform_layers": "first:2", "model.offset_channels": f"{XSS}"}.items():
        client.log_param(rid, key, value)
    for mag, value in (("0", 0.5), ("30", 0.4)):
        client.log_metric(rid, f"robust/rotation/{mag}/map", value)
        client.log_metric(rid, f"robust/rotation/{mag}/micro_f1", value)
    client.log_metric(rid, "offset/conv0/mean_abs", 0.3)
    client.log_metric(rid, "offset/conv0/eff_dilation", 1.1)
    client.log_metric(rid, "erf/rms_radius_px", 5.0)
    buf = io.BytesIO()
    np.save(buf, np.ones((8, 8), dtype=np.float32) / 64)
    (tmp_path / "erf.npy").write_bytes(buf.getvalue())
    client.log_artifact(rid, str(tmp_path / "erf.npy"), "analysis")
    client.set_terminated(rid)
    html = analysis_section(pd.DataFrame({"run_id": [rid], "status": ["FINISHED"]}), uri)
    parse(html)
    assert XSS not in html and "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html


def test_runs_without_analysis_get_a_hint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("plain")
    rid = client.create_run(exp, tags={"harness.role": "child"}).info.run_id
    client.set_terminated(rid)
    html = analysis_section(pd.DataFrame({"run_id": [rid]}), uri, ablation="plain")
    parse(html)
    assert "harness eval plain" in html and "<svg" not in html
    empty = analysis_section(pd.DataFrame(), uri)
    assert "harness eval ABLATION" in empty
