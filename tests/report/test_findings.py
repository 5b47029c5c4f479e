"""The report's findings on real MLflow stores: headline choice, Holm and power, chance, per class, size, OOD.

`heldout`: baseline `base` and three variants × 4 seeds with the held-out metrics of tracking.md
(test_*, chance_*, ood_*, test_map_<size>, robust/<family>/<m>/map) and eval/per_class_ap.json:
`strong` gains 0.08 test mAP, `tiny` 0.002 (noise 0.01), `chancey` sits at the chance level.
`valonly`: no test metrics; best val mAP far above final val mAP. `single`: one seed per variant.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy import stats as st
from statsmodels.stats.multitest import multipletests

from harness.report.data import OPTIMISTIC, headline, load_ablations
from harness.report.evidence import BETTER, INCONCLUSIVE, TOO_FEW
from harness.report.findings import evidence_table, ood_table, robustness_auc, size_table, summary
from harness.report.findings_render import EVIDENCE_KEYS, evidence_markdown
from harness.report.perclass import per_class_deltas
from harness.report.render import comparison_csv, comparison_markdown, render_ablation_html
from harness.tracking import names, query

from .conftest import T0, ChildSpec, write_ablation

SEEDS = (1, 2, 3, 4)
GAIN = {"base": 0.0, "strong": 0.08, "tiny": 0.002, "chancey": -0.175}
CLASSES = ("person", "car", "dog", "cat", "boat", "kite")
CLASS_SHIFT = {"person": 0.10, "car": 0.05, "dog": -0.07}  # strong vs base, per class


def heldout_values(variant: str, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([len(variant), seed])
    seed_effect = 0.01 * seed  # shared by every variant: what pairing removes
    test_map = 0.45 + GAIN[variant] + seed_effect + rng.normal(0, 0.004 if variant != "tiny" else 0.01)
    out = {
        names.test_of("map"): test_map, names.test_of("micro_f1"): test_map + 0.05,
        names.chance_of("map"): 0.30, names.chance_of("micro_f1"): 0.12,
        names.ood_of("map"): test_map - 0.1 - (0.0 if variant == "strong" else 0.03),
        names.SELECTED_EPOCH: 3.0,
    }
    for i, size in enumerate(names.OBJECT_SIZES):
        out[names.by_size(names.test_of("map"), size)] = test_map - 0.1 + 0.1 * i + (0.05 if size == "small" and
                                                                                      variant == "strong" else 0)
    for magnitude, drop in ((0, 0.0), (30, 0.1), (60, 0.2)):
        extra = 0.05 * magnitude / 60 if variant == "strong" else 0.0
        out[f"{names.ROBUST_PREFIX}rotation/{magnitude}/map"] = test_map - drop + extra
    return out


def per_class_json(variant: str, seed: int) -> str:
    rng = np.random.default_rng([len(variant), seed, 7])
    ap = [0.4 + 0.01 * seed + (CLASS_SHIFT.get(c, 0.0) if variant == "strong" else 0.0) + rng.normal(0, 0.003)
          for c in CLASSES]
    return json.dumps({"split": "test", "epoch": 3, "classes": list(CLASSES), "ap": ap, "support": [50] * 6})


@pytest.fixture(scope="module")
def datas(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("findings")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    children = [ChildSpec(v, s, baseline=v == "base", epochs=3) for v in GAIN for s in SEEDS]
    written = write_ablation(uri, root / "art", "heldout", "held-out metrics", "base", children)
    for info in written.values():
        spec = info["spec"]
        metrics = [Metric(k, float(v), T0 + 500, 0) for k, v in heldout_values(spec.variant, spec.seed).items()]
        client.log_batch(info["run_id"], metrics=metrics)
        client.log_text(info["run_id"], per_class_json(spec.variant, spec.seed), names.PER_CLASS_AP_ARTIFACT)
    write_ablation(uri, root / "art", "valonly", "", "conv",
                   [ChildSpec(v, s, quality=q, baseline=v == "conv") for v, q in (("conv", 0.5), ("deform", 0.52))
                    for s in (1, 2, 3)])
    write_ablation(uri, root / "art", "single", "", "conv",
                   [ChildSpec("conv", 1, baseline=True), ChildSpec("deform", 1, quality=0.6)])
    return {d.name: d for d in load_ablations(query.open_store(uri))}


def _row(table: pd.DataFrame, variant: str) -> pd.Series:
    return table.set_index("variant").loc[variant]


def test_headline_is_test_map_when_logged(datas) -> None:
    assert headline(datas["heldout"]).key == "test/map"
    assert headline(datas["valonly"]).key == "final/val/map"  # never best/val/map
    table = evidence_table(datas["valonly"])
    fin = datas["valonly"].finished
    deform = fin[fin["variant"] == "deform"]
    assert _row(table, "deform")["mean"] == pytest.approx(deform["final/val/map"].mean())
    html = render_ablation_html(datas["valonly"])
    assert OPTIMISTIC in html and "final val mAP (last epoch" in html


def test_deltas_p_and_holm_match_scipy_and_statsmodels(datas) -> None:
    data = datas["heldout"]
    table = evidence_table(data)
    fin = data.finished.set_index(["variant", "seed"])["test/map"]
    ps = []
    for variant in ("chancey", "strong", "tiny"):
        a, b = [fin[(variant, s)] for s in SEEDS], [fin[("base", s)] for s in SEEDS]
        ref = st.ttest_rel(a, b)
        row = _row(table, variant)
        assert row["method"] == "paired t" and row["delta"] == pytest.approx(np.mean(np.subtract(a, b)))
        assert row["p"] == pytest.approx(ref.pvalue)
        ci = ref.confidence_interval(0.95)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        ps.append(ref.pvalue)
    holm = multipletests(ps, method="holm")[1]
    for variant, p in zip(("chancey", "strong", "tiny"), holm, strict=True):
        assert _row(table, variant)["p_holm"] == pytest.approx(p)
    assert _row(table, "strong")["verdict"] == BETTER
    assert _row(table, "tiny")["verdict"] == INCONCLUSIVE
    assert _row(table, "base")["verdict"] == "baseline" and math.isnan(_row(table, "base")["p"])


def test_never_a_winner_whose_corrected_interval_includes_zero(datas) -> None:
    table = evidence_table(datas["heldout"])
    for _, row in table[~table["is_baseline"]].iterrows():
        if row["verdict"] == BETTER:
            assert row["holm_ci_low"] > 0 and row["p_holm"] < 0.05
        if row["holm_ci_low"] <= 0 <= row["holm_ci_high"]:
            assert row["verdict"] != BETTER
    (point,) = summary(table, datas["heldout"])
    assert point["outcome"] == "better than the baseline after Holm correction: strong"
    tiny = next(s["text"] for s in point["sentences"] if s["text"].startswith("tiny"))
    need = int(_row(table, "tiny")["seeds_needed"])
    assert f"tiny: inconclusive: would need about {need} seeds to detect an effect of" in tiny
    assert need > len(SEEDS)


def test_chance_flag(datas) -> None:
    table = evidence_table(datas["heldout"])
    assert _row(table, "chancey")["chance_flag"] == "not better than chance"
    assert _row(table, "strong")["chance_flag"] == "" and _row(table, "base")["chance_map"] == pytest.approx(0.30)
    assert _row(table, "strong")["chance_f1"] == pytest.approx(0.12)
    md = evidence_markdown(datas["heldout"])
    assert "it is not better than chance" in md


def test_one_seed_says_intervals_need_two(datas) -> None:
    table = evidence_table(datas["single"])
    assert _row(table, "deform")["verdict"] == TOO_FEW
    (point,) = summary(table, datas["single"])
    assert "intervals need ≥2 seeds" in point["outcome"] and "n&lt;2" not in render_ablation_html(datas["single"])
    assert "intervals need ≥2 seeds per variant" in point["sentences"][0]["text"]


def test_per_class_gains_and_losses(datas) -> None:
    data = datas["heldout"]
    table = per_class_deltas(data.per_class, data.finished, data.baseline, top=2)
    strong = table[table["variant"] == "strong"]
    assert list(strong[strong["direction"] == "gain"]["class"]) == ["person", "car"]
    assert list(strong[strong["direction"] == "loss"]["class"])[0] == "dog"
    person = strong.set_index("class").loc["person"]
    pc = data.per_class.merge(data.finished[["run_id", "variant", "seed"]], on="run_id")
    pc = pc[pc["class"] == "person"].set_index(["variant", "seed"])["ap"]
    ref = st.ttest_rel([pc[("strong", s)] for s in SEEDS], [pc[("base", s)] for s in SEEDS]).confidence_interval()
    assert person["delta"] == pytest.approx(0.10, abs=0.01) and person["method"] == "paired t"
    assert (person["low"], person["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    html = render_ablation_html(data)
    assert 'id="per-class-table"' in html and "person" in html


def test_size_ood_and_robustness_tables(datas) -> None:
    data = datas["heldout"]
    sizes = size_table(data)
    small = sizes[(sizes["variant"] == "strong") & (sizes["size"] == "small")].iloc[0]
    assert small["metric"] == "test/map_small" and small["delta"] == pytest.approx(0.08 + 0.05, abs=0.01)
    ood = ood_table(data).set_index("variant")
    assert ood.loc["strong", "gap"] == pytest.approx(-0.1, abs=1e-9)
    assert ood.loc["tiny", "delta"] == pytest.approx(_row(evidence_table(data), "tiny")["delta"], abs=1e-9)
    auc = robustness_auc(data).set_index("variant")
    # strong's curve gains 0.05·m/60 on top of its 0.08: mean over [0, 60] of the extra is 0.025
    assert auc.loc["strong", "delta"] == pytest.approx(0.08 + 0.025, abs=0.01)
    assert auc.loc["strong", "method"] == "paired t"
    html = render_ablation_html(data)
    for anchor in ('id="size-table"', 'id="ood-table"', 'id="robust-auc-table"', 'id="accuracy-vs-model"'):
        assert anchor in html


def test_markdown_and_csv_carry_the_same_evidence_columns(datas) -> None:
    chosen = [datas["heldout"], datas["single"]]
    frame = pd.read_csv(io.StringIO(comparison_csv(chosen)))
    assert set(EVIDENCE_KEYS) <= set(frame.columns)
    md = comparison_markdown(chosen)
    header = next(line for line in md.splitlines() if line.startswith("| group | metric"))
    assert [h.strip().replace("\\_", "_") for h in header.strip("|").split("|")] == ["group", *EVIDENCE_KEYS]
    strong = frame[(frame["ablation"] == "heldout") & (frame["variant"] == "strong")].iloc[0]
    row = _row(evidence_table(datas["heldout"]), "strong")
    for key in ("mean", "ci_low", "ci_high", "p", "p_holm", "mde", "seeds_needed", "chance_map"):
        assert strong[key] == pytest.approx(row[key], rel=1e-5)
    assert strong["verdict"] == BETTER
