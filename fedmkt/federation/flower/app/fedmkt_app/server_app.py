"""The ServerApp component (the implementation lives in the installed fedmkt package)."""

from fedmkt.federation.flower.server_app import app

__all__ = ["app"]
