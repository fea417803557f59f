"""Speed: wall time against FLOPs, the DiT and the sparse forward, weights, interrupts, previews."""
