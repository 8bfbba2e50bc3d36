"""The controller: where each block should be. The block table, the score R(b, s), the jitted tick (state
update), calibration of ψ and δ, the quality budget, and the scored policies that run them (dense and MoE)."""
