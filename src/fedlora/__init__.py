"""FedLoRA-Optimizer: federated LoRA fine-tuning with global and local optimization."""

__version__ = "0.1.0"
