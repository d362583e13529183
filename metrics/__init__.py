"""The papers' metrics, calibration, plots and the report writer."""
from metrics.classification import compute_metrics

__all__ = ["compute_metrics"]
