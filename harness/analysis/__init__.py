"""Why deformable convolution helps: robustness, sampling locations, offset statistics, receptive fields.

- `robustness`: val metrics under controlled rotation, scale, stretch and shear.
- `sampling`: layer geometry and the learned sampling points, composed through consecutive layers.
- `offsets`: |Δp|, effective dilation and tap spread per deformable layer, by object size and background.
- `erf`: gradient-based effective receptive fields.
- `pipeline`: analyse a trained run and log into its MLflow run (`harness eval`).
- `section`: the report's HTML section, read from MLflow only.

docs/analysis.md lists every number and name.
"""

from harness.analysis.pipeline import AnalysisOptions, analyze_runs, post_training_analysis

__all__ = ["AnalysisOptions", "analyze_runs", "post_training_analysis"]
