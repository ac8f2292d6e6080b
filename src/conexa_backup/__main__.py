"""``python -m conexa_backup``."""

from conexa_backup.cli import main

main()
