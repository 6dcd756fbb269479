"""Metrics: per-class rates, pruning-induced bias (CEV/SDE) and model similarity.

See ``METRICS.md`` for the exact definitions.
"""

from prunebias_jax.metrics.bias import (
    CONVENTIONS,
    ZERO_RATE_RULES,
    BiasChange,
    cev_from_changes,
    combined_error_variance,
    relative_rate_change,
    sde_from_changes,
    symmetric_distance_error,
)
from prunebias_jax.metrics.confusion import (
    ClassRates,
    confusion_matrix,
    per_class_rates,
    rate_denominators,
    rates_from_confusion,
)
from prunebias_jax.metrics.similarity import linear_cka, prediction_agreement

__all__ = [
    "BiasChange",
    "CONVENTIONS",
    "ClassRates",
    "ZERO_RATE_RULES",
    "cev_from_changes",
    "combined_error_variance",
    "confusion_matrix",
    "linear_cka",
    "per_class_rates",
    "prediction_agreement",
    "rate_denominators",
    "rates_from_confusion",
    "relative_rate_change",
    "sde_from_changes",
    "symmetric_distance_error",
]
