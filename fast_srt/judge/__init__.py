"""Judges and their measurement: the labelled judge set (data), the hidden-state probe judge (probe), and the
agreement report of `fast-srt judge-eval` (evaluate)."""
