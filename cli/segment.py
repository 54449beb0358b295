"""`ovseg segment`."""

from ovseg.cli._pending import pending


def segment() -> None:
    """(being built)"""
    pending("ovseg segment")
