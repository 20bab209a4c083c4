"""What measures dealign, kept apart from what ships: nothing in the runtime imports this package.

``bench`` (``dealign bench``: what DeAL costs), ``harm_cost`` (``dealign bench --suite harm-cost``: what
R_harmless costs inside the search), ``loadtest`` (``python -m dealign.tools.loadtest``: a
bounded load test of ``dealign serve``), ``llama_server`` (start the built llama.cpp server for the
remote backend's tests and benchmark) and ``processes`` (the helpers they share: a free loopback port,
stopping a child process, a process's resident memory).
"""
