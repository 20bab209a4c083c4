"""The ``dealign`` command line: ``generate`` (one prompt or a JSONL batch) and ``demo``."""
