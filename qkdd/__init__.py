"""qkdd: quantum key distribution daemons and their post-processing core."""

__version__ = "0.1.0"
