"""``GET /api/admin/backups`` and ``GET /api/admin/backups/status`` (to be built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
