"""LoRA: the peft glue on one shared base model (:mod:`.handle`), the rank operations of
heterogeneous-rank aggregation (:mod:`.rank_ops`) and the rank policies that give each client
its rank (:mod:`.ranks`). No Flower here; this file imports nothing."""
