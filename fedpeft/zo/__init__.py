"""Zeroth-order / shared-randomness training: device-independent directions, local steps,
and the per-process state that syncs a model to seed/scalar coefficients."""
