"""Uncertainty and calibration metrics for Monte Carlo samples (classification and regression).

Samples carry the sample axis first: class probabilities ``(T, N, C)``, regression predictions
``(T, N)`` or ``(T, N, D)``.  ``predictive_mean`` exists in both :mod:`.classification` and
:mod:`.regression` (different inputs), so it is reached through its submodule.
"""

from dropkit.metrics import calibration as calibration
from dropkit.metrics import classification as classification
from dropkit.metrics import detection as detection
from dropkit.metrics import regression as regression
from dropkit.metrics import stateful as stateful
from dropkit.metrics.calibration import CalibrationError as CalibrationError
from dropkit.metrics.calibration import ReliabilityData as ReliabilityData
from dropkit.metrics.calibration import expected_calibration_error as expected_calibration_error
from dropkit.metrics.calibration import max_calibration_error as max_calibration_error
from dropkit.metrics.calibration import reliability_diagram_data as reliability_diagram_data
from dropkit.metrics.classification import UncertaintyScores as UncertaintyScores
from dropkit.metrics.classification import accuracy as accuracy
from dropkit.metrics.classification import brier_score as brier_score
from dropkit.metrics.classification import entropy as entropy
from dropkit.metrics.classification import expected_entropy as expected_entropy
from dropkit.metrics.classification import mutual_information as mutual_information
from dropkit.metrics.classification import nll as nll
from dropkit.metrics.classification import predictive_entropy as predictive_entropy
from dropkit.metrics.classification import uncertainty_scores as uncertainty_scores
from dropkit.metrics.classification import variation_ratio as variation_ratio
from dropkit.metrics.detection import DetectionResult as DetectionResult
from dropkit.metrics.detection import auroc as auroc
from dropkit.metrics.detection import average_precision as average_precision
from dropkit.metrics.detection import misclassification_detection as misclassification_detection
from dropkit.metrics.detection import ood_detection as ood_detection
from dropkit.metrics.plots import plot_regression_intervals as plot_regression_intervals
from dropkit.metrics.plots import plot_reliability_diagram as plot_reliability_diagram
from dropkit.metrics.plots import plot_uncertainty_histograms as plot_uncertainty_histograms
from dropkit.metrics.regression import MCRegressionAccumulator as MCRegressionAccumulator
from dropkit.metrics.regression import calibration_curve as calibration_curve
from dropkit.metrics.regression import gaussian_log_likelihood as gaussian_log_likelihood
from dropkit.metrics.regression import interval_coverage as interval_coverage
from dropkit.metrics.regression import mc_rmse as mc_rmse
from dropkit.metrics.regression import mixture_log_likelihood as mixture_log_likelihood
from dropkit.metrics.regression import predictive_variance as predictive_variance
from dropkit.metrics.stateful import Accuracy as Accuracy
from dropkit.metrics.stateful import BrierScore as BrierScore
from dropkit.metrics.stateful import CalibrationMetric as CalibrationMetric
from dropkit.metrics.stateful import MCUncertainty as MCUncertainty
from dropkit.metrics.stateful import NegativeLogLikelihood as NegativeLogLikelihood

__all__ = [
    "Accuracy",
    "BrierScore",
    "CalibrationError",
    "CalibrationMetric",
    "DetectionResult",
    "MCRegressionAccumulator",
    "MCUncertainty",
    "NegativeLogLikelihood",
    "ReliabilityData",
    "UncertaintyScores",
    "accuracy",
    "auroc",
    "average_precision",
    "brier_score",
    "calibration",
    "calibration_curve",
    "classification",
    "detection",
    "entropy",
    "expected_calibration_error",
    "expected_entropy",
    "gaussian_log_likelihood",
    "interval_coverage",
    "max_calibration_error",
    "mc_rmse",
    "misclassification_detection",
    "mixture_log_likelihood",
    "mutual_information",
    "nll",
    "ood_detection",
    "plot_regression_intervals",
    "plot_reliability_diagram",
    "plot_uncertainty_histograms",
    "predictive_entropy",
    "predictive_variance",
    "regression",
    "reliability_diagram_data",
    "stateful",
    "uncertainty_scores",
    "variation_ratio",
]
