"""Command-line tools run from the repository root (scripts/aggregate.py, ...)."""
