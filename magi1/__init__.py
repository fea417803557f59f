"""MAGI-1 in plain PyTorch: the DiT, VAE, text conditioning and autoregressive sampler (no ComfyUI here)."""
