"""Shared pieces of batcher's benchmarks, one concern per module.

Everything is measured from outside, the way a user runs batcher: the mock
server and ``batcher run`` are separate processes (``python -m batcher ...``),
so the figures include interpreter start-up, imports and the final write, and
the two processes compete for the machine's cores as they would in real use.

* :mod:`harness.report`: the header (command, machine, commit), tables,
  targets, the ``--small`` flag, the work folder and :func:`bench_main`.
* :mod:`harness.load`: :class:`LoadMeter` says how busy other processes kept
  the machine.
* :mod:`harness.jobs`: inputs, job files and :func:`synthesize_checkpoint`,
  which writes the checkpoint of a run stopped near the end (with batcher's
  own ``Checkpoint``), so "resume near the end of a million rows" takes
  seconds to set up instead of a million requests.
* :mod:`harness.processes`: :class:`BatcherProcess` starts ``batcher run JOB
  -q`` through a tiny launcher that reaps it with ``os.wait4``, whose
  ``rusage`` gives batcher's CPU time and peak RSS.
* :mod:`harness.mock`: :class:`MockProcess` starts ``batcher mock-server`` on
  a port the kernel picks, reads ``/_mock/stats`` and reports the mock's own
  CPU time.
* :mod:`harness.journal`: :class:`JournalWatcher` follows the checkpoint as
  it grows, timing the sending period without adding load to the mock.
* :mod:`harness.watched`: :func:`run_watched`, one timed run against a mock,
  the shape the rate benchmarks (utilization, sharing) share.
* :mod:`harness.profiling`: py-spy, and where a profiled run spent its time.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


class BenchError(RuntimeError):
    """The benchmark itself could not run (as opposed to a target being missed)."""
