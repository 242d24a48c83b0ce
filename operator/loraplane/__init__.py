"""loraplane: LoRA fine-tuning and multi-LoRA serving on Kubernetes."""
__version__ = "0.1.0"
