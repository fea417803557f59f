"""Several GPUs: the per-rank plan and the measured multi-process speed."""
