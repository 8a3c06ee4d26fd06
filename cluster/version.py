"""The version of cluster (agents report it; `up` compares it with its own)."""

__version__ = "0.1.0"
