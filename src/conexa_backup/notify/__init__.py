"""Notifiers: a small protocol (``base``), a registry, one module per type, a dispatcher."""
