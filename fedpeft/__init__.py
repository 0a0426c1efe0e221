"""fedpeft: federated fine-tuning of language models with LoRA deltas, on Flower."""

__version__ = "0.1.0"
