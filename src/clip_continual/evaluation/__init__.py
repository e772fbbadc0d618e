"""Evaluation of a model after each continual step: features, zero-shot classification,
retrieval, continual-learning metrics, MTIL and class-incremental sequences, report tables."""
