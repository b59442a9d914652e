"""``spcxr serve``: trained models behind a local HTTP service with micro-batching, and a page."""

from spcxr.serve.app import ServeConfig, Service, create_app, serve
from spcxr.serve.batcher import Batcher, BatchStats, QueueFull

__all__ = ["BatchStats", "Batcher", "QueueFull", "ServeConfig", "Service", "create_app", "serve"]
