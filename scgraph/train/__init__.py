"""Training: the engine-agnostic core, the plain loop, and (later) the DeepSpeed engine."""
