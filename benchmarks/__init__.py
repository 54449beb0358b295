"""Benchmarks, diagnostics and experiment drivers (`ovseg bench ...`). They import the library;
the library never imports them."""
