"""The ClientApp component (the implementation lives in the installed fedmkt package)."""

from fedmkt.federation.flower.client_app import app

__all__ = ["app"]
