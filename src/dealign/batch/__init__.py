"""Batch answering: rows of prompts and settings (JSONL) in, one answer row each out, resumable.

``jobs`` reads and checks the rows and writes the answer rows; ``serial`` answers them in this
process, ``ray_runner`` on Ray actors; ``run`` picks one; ``spec`` says how to build the aligner
(``AlignerSpec.build``, also what the CLI uses for a single prompt or the server).
Imports point one way: run -> serial, ray_runner -> jobs -> settings -> errors; ray_runner, run -> spec -> api.
"""

from .jobs import ANSWER_FIELDS, Job, answer, make_job, read_jobs, record, rows_done
from .run import run_batch
from .spec import AlignerSpec

__all__ = ["ANSWER_FIELDS", "AlignerSpec", "Job", "answer", "make_job", "read_jobs", "record", "rows_done", "run_batch"]
