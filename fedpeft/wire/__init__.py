"""Versioned messages between coordinator and clients, and their Flower encoding.

- :mod:`.messages`: headers, LoRA instructions and updates, client info, evaluation reports;
- :mod:`.zo`: seed/scalar instructions and updates;
- :mod:`.adapter`: LoRA factors as Flower arrays, with the upload/download codecs of
  :mod:`.codecs`;
- :mod:`.prune`: structured-pruning plans and kept structures;
- :mod:`.types`: the small value types (factors, specs) and typed field access.

Nothing here is unpickled; every field is read with its type checked. This file imports
nothing, so importing one submodule does not import the others (``prune/`` uses
:mod:`.types` while :mod:`.prune` uses ``prune/``).
"""
