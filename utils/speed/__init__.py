"""GPU training speed: the fast QLoRA path, its kernels, the flat optimizer and the benchmark."""
