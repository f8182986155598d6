"""Evaluation of pretrained encoders: the paper's linear probe with its controls, figures, and the
Table II comparison across MLflow runs."""
