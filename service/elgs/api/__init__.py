"""The HTTP service (design.md, section 6): ``create_app(settings=None, models=None)`` builds the FastAPI app."""

from elgs.api.app import create_app
from elgs.api.settings import Settings

__all__ = ["Settings", "create_app"]
