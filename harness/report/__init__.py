"""`harness report`: MLflow runs → comparison tables, plots and one offline HTML page per ablation.

    from harness.tracking.query import open_store
    from harness.report import load_ablations, write_html_reports
    datas = load_ablations(open_store("sqlite:///results/mlflow.db"))
    write_html_reports(datas, Path("reports"))

See docs/report.md.
"""

from harness.report.data import AblationData, group_stats, load_ablations
from harness.report.render import (
    comparison_csv,
    comparison_frame,
    comparison_markdown,
    render_ablation_html,
    render_index_html,
    write_html_reports,
)

__all__ = [
    "AblationData",
    "comparison_csv",
    "comparison_frame",
    "comparison_markdown",
    "group_stats",
    "load_ablations",
    "render_ablation_html",
    "render_index_html",
    "write_html_reports",
]
