"""Pretraining: the DeepSpeed trainer and its parts (distributed set-up, checkpoints, DeepSpeed config,
cost telemetry)."""
