"""``dealign serve``: an OpenAI-compatible HTTP server for DeAL (FastAPI + uvicorn, the ``server`` extra).

``limits`` (the operator's bounds) imports nothing heavy, so the command line can show its defaults;
``app.create_app(aligner, limits)`` builds the FastAPI application, ``worker`` runs its searches one at a
time (the load test that drives a server is ``dealign.tools.loadtest``, apart from what ships).
"""

from .limits import ServerLimits

__all__ = ["ServerLimits"]
