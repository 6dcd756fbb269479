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
from prunebias_jax.metrics.cie import (
    cie_report,
    compression_identified_exemplars,
    modal_predictions,
    pruning_identified_exemplars_all_disagree,
    save_cie_grid,
)
from prunebias_jax.metrics.similarity import (
    cka_matrix,
    debiased_linear_cka,
    linear_cka,
    minibatch_cka,
    minibatch_cka_init,
    minibatch_cka_result,
    minibatch_cka_update,
    prediction_agreement,
    streaming_linear_cka,
    streaming_linear_cka_init,
    streaming_linear_cka_result,
    streaming_linear_cka_update,
    svcca_conv_distance,
    svcca_distance,
)

__all__ = [
    "cie_report",
    "cka_matrix",
    "compression_identified_exemplars",
    "debiased_linear_cka",
    "minibatch_cka",
    "minibatch_cka_init",
    "minibatch_cka_result",
    "minibatch_cka_update",
    "modal_predictions",
    "pruning_identified_exemplars_all_disagree",
    "save_cie_grid",
    "streaming_linear_cka",
    "streaming_linear_cka_init",
    "streaming_linear_cka_result",
    "streaming_linear_cka_update",
    "svcca_conv_distance",
    "svcca_distance",
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
