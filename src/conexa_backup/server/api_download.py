"""``GET /api/admin/backups/{id}/download`` (to be built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
