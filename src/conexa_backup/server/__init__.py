"""The HTTP API (``conexa-backup serve``): a second front door beside ``cli.py``."""
