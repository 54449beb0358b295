"""`ovseg sql QUERY`: SQL over the curated tables (DuckDB, read-only)."""

from ovseg.cli._pending import pending


def sql() -> None:
    """Run SQL over the manifest, entity index and other tables."""
    pending("ovseg sql")
