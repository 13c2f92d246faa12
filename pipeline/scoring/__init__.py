"""Scoring: the frozen classifier, the real-data reference and every metric of a sample set."""
