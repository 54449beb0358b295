"""ovseg.cli: the Typer app. Thin wrappers that parse options and call library functions."""
