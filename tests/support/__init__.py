"""Shared test helpers: daemon processes, scrapes, builders, and the import-graph check."""
