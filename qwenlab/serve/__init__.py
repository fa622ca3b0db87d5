"""OpenAI-compatible HTTP server over the engine (``qwenlab serve``). See docs/server.md."""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
