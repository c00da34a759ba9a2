"""Exceptions shared by modules that must not import each other (imports nothing)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config key or value; the message is one line and names the key."""
