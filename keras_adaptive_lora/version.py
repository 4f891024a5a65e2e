"""The library's version (one place; the package and adapter files read it)."""

__version__ = "0.1.0"
