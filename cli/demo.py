"""`ovseg demo`."""

from ovseg.cli._pending import pending


def demo() -> None:
    """(being built)"""
    pending("ovseg demo")
