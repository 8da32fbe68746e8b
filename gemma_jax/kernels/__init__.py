"""Hand-written kernels XLA lacks: a panel-packed f32 matmul for decoding on CPU."""
