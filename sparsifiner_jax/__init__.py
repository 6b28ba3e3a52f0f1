"""sparsifiner_jax: learned instance-dependent sparse attention for Vision Transformers (JAX/Flax NNX)."""

__version__ = "0.1.0"
