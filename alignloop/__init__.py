"""alignloop: text-to-image serving that learns from its users."""

__version__ = "0.1.0"
