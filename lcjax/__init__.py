"""lcjax: long-context language modeling in JAX and Flax NNX."""

__version__ = "0.1.0"
