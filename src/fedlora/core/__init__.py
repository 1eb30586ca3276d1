"""The algorithm core: pure PyTorch over tensors and state dicts, no transport, no model loading."""
