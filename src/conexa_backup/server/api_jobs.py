"""``POST /api/admin/backups/trigger``, ``POST /api/admin/backups/{id}/restore`` and
``/api/admin/jobs`` (to be built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
