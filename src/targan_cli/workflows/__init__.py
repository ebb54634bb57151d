"""Glue between the library layers and the CLI: each workflow returns a result dataclass."""
