"""The OpenAI-compatible HTTP server: protocol, routes, metrics, FAQ grounding and the app factory."""

from palmkit.infer.engine import Engine
from palmkit.serve.app import create_app, serve

__all__ = ["Engine", "create_app", "serve"]
