"""Pallas kernels for lcjax's hot spots. Each module holds a plain-jnp reference (the specification), the Pallas
kernels for TPU (Mosaic) and GPU, and one public function that picks an implementation by backend."""
