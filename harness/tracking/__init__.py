"""The package that talks to MLflow: the runner writes runs, the report reads them (docs/tracking.md)."""
