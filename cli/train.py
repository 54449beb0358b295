"""`ovseg train`."""

from ovseg.cli._pending import pending


def train() -> None:
    """(being built)"""
    pending("ovseg train")
