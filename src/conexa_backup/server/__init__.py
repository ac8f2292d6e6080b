"""The HTTP API server (``conexa-backup serve``): a second front door beside ``cli.py``.

Nothing below this package imports a web framework; the modules here that hold rules (jobs,
auth) import none either, so they are tested as plain Python.
"""
