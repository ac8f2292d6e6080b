"""conexa-backup: backups of the Conexa PostgreSQL database and uploads that you can restore."""

__version__ = "0.1.0"
