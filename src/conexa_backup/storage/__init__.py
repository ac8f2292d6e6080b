"""Storage targets: a small protocol (``base``), a registry, one module per type."""
