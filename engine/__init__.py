"""hookray engine: the pure-Python core (no Ray import anywhere in this package)."""

__version__ = "0.1.0"
