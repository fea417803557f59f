"""Cache quality: the policy comparisons, equal-quality speed-ups, continuity, decode seams, fp8 error, the metrics."""
