"""LoRA training in MLX: the parametrization, the objective, the optimizer, the data, the run."""
