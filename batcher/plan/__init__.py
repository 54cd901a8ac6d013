"""What a job means, shared by every driver (online, ``mode: batch``, Ray):

- ``jobplan``: the one core: messages, request keys and bodies, result layout,
  the column check, prices, what sending follows from the job;
- ``preflight``: a job checked against its input file (``Prepared``, a
  JobPlan with its rows) and the ``--dry-run`` estimate;
- ``rows``, ``pipeline``, ``usage``: a row on its way, the path it travels
  (limit, send, classify, retry) and what a reply is worth;
- ``budgets``: a budget as a run meets it; ``keywords``: a job given as
  keyword arguments; ``paths``: every path a job writes; ``finish``: the
  results write and what a run did.
"""
