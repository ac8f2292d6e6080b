"""``python -m conexa_backup``."""

from conexa_backup.cli import main

if __name__ == "__main__":
    main()
