"""Algorithms: what each one can do, as data (:mod:`.capabilities`)."""
