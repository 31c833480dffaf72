"""OpenAI-compatible HTTP server over the engine: continuous batching, streaming, metrics (``moetandem serve``)."""
from moetandem.serve.app import create_app
from moetandem.serve.loop import EngineLoop

__all__ = ["EngineLoop", "create_app"]
