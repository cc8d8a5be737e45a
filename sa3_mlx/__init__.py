"""sa3-mlx: Stable Audio 3 inference in pure MLX."""

__version__ = "0.1.0"
