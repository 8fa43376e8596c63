"""``GET /``: the small web page (plain HTML and JavaScript from ``elgs/api/static``, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise HTTPException(404, f"the web page is not installed here ({index} is missing: the package was built "
                                 "without its data files); the API itself works, see /docs")
    return FileResponse(index, media_type="text/html")
