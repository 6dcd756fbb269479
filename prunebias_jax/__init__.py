"""prunebias_jax: bias induced by pruning, measured and mitigated with knowledge distillation."""

__version__ = "0.1.0"
