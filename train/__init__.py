"""Training scripts (thin absl front ends over `gemma_jax.training`)."""
