"""Shipped consumer rule sets (YAML)."""
