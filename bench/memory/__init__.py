"""Memory: the plan's tables and the measured memory of long videos."""
