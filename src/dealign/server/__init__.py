"""``dealign serve``: an OpenAI-compatible HTTP server for DeAL (FastAPI + uvicorn, the ``server`` extra).

``limits`` (the operator's bounds) imports nothing heavy, so the command line can show its defaults;
``app.create_app(aligner, limits)`` builds the FastAPI application (the load test that drives it is ``dealign.tools.loadtest``).
"""

from .limits import ServerLimits

__all__ = ["ServerLimits"]
