"""IISAN / IISAN-Versa: decoupled side networks over cached foundation-model states."""

__version__ = "0.1.0"
