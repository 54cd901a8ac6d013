"""The same job on a Ray cluster: a Ray Dataset in, the result columns added.

Install with ``pip install 'batcher[ray]'``; nothing else in batcher imports
this package (the CLI only for ``run --ray``), so ``import batcher`` never
loads Ray.

- **One plan**: the driver makes the run's ``batcher.plan.jobplan.JobPlan``
  (messages with the reply schema's instruction, request keys and bodies,
  reply checks, price, result layout) and hands it to every worker, so rows
  are sent, checked and laid out exactly as on one machine: the results carry
  the same columns, in the same order and types (the reply schema's typed
  columns and ``replies`` included).
- **Workers** (``batcher.raydata.worker``) are a callable class used with
  ``Dataset.map_batches`` (``concurrency`` = the number of workers). Each
  sends its batch's rows through ``batcher.plan.pipeline.attempt_row`` -- the
  same retry policy, error classification and reply checks as on one
  machine -- with up to ``limits.concurrency`` requests in flight.
- **One rate limit for the cluster** (``batcher.raydata.limit``): a named
  actor holds a ``batcher.limits.leases.ClusterLimit``; each worker's limiter
  leases slices of it and reports what the server said with each lease (see
  ``batcher.limits.leases``: the actor is asked about twice a second per
  worker, whatever the request rate).
- **Failures**: a row whose retries run out is a row with status ``error``.
  A bad key or exhausted quota seen by any worker is recorded by the actor,
  every other worker stops at its next lease, and the run stops (exit 3);
  so do too many rows in a row failing the same way.
- **Resume**: with a checkpoint folder, each worker appends every finished
  row to a journal file of its own there, keyed by the row's request key
  (``batcher.store.keys``, as on one machine; ``batcher.store.answers``); a
  worker answers a row found ``ok`` there from the journal instead of sending
  it. Killing the driver loses only the requests in flight; running the same
  command again sends only the rest. On a cluster the folder must be on
  storage every node sees (NFS, a mounted bucket), or the rows answered on
  another node are sent again.
- **Progress** on the driver (``batcher.raydata.driver``): workers' counters
  travel with their leases (and a report after each batch) to the limit's
  actor, which the driver polls.

Not on Ray (yet): ``limits.max_cost_usd``/``max_total_tokens``, ``mode: batch``,
``--limit`` and ``--dry-run``; the summary has no per-class failure lines.
"""

from __future__ import annotations

from batcher.plan.paths import journal_folder, results_folder
from batcher.raydata.driver import RayOptions, run_dataset, run_job_on_ray

__all__ = ["RayOptions", "journal_folder", "results_folder", "run_dataset", "run_job_on_ray"]
