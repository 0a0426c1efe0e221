"""Wrappers that compose around any strategy over the linear seam: Byzantine-robust rules
(:mod:`.robust`) and client-level differential privacy (:mod:`.dp`)."""
