"""Shared by every test folder. The repository root is on ``sys.path`` through
``pythonpath`` in pyproject.toml, so helpers are imported as ``tests.support...``;
paths to the fixtures are in ``tests/support/paths.py``."""
