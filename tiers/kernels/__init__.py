"""Pallas dequant-matmul kernels (int8_matmul, int4_matmul), each beside its jnp reference; select picks the path."""
