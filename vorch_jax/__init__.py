"""vorch_jax: dynamic multi-tier weight residency for LLM inference.

Rooms (one-way flow): `vorch_jax.models` says what the blocks are, `vorch_jax.tiers` how a block is held and moved,
`vorch_jax` (this package) decides where each block should be, `vorch_jax.experiments` what was measured.
This module stays import-light so that importing a sub-room never drags in the controller.
"""

__version__ = "0.1.0"
