"""The Aftershock node agent: applies faults on command, never leaves one behind."""

__version__ = "0.1.0"
