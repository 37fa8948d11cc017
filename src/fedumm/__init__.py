"""fedumm: federated LoRA fine-tuning of unified multimodal models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
