"""Import time: what ``import batcher.errors``, the mock server and the whole stack cost.

Each statement runs in a fresh interpreter (``python -X importtime -c ...``),
``--repeat`` times; the figure is the wall time of the statement itself, timed
inside that interpreter (start-up excluded), as the median and the minimum of
the runs. The heaviest imports it pulled in come from ``-X importtime``'s
cumulative column (leaving out what the interpreter imports at start-up), and
the last column says which of the heavy libraries (pandas, pyarrow, aiohttp,
numpy) ended up loaded.

Target: ``import batcher.errors`` and ``import batcher.mock_server`` under 0.2 s.

Usage: ``python bench/import_time.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from harness import PYTHON, REPO, BenchError
from harness.report import print_header, print_table, print_targets

STATEMENTS = (
    "import batcher.errors",
    "import batcher",
    "import batcher.mock_server",
    "from batcher.mock_server import MockServer",
    "import batcher.api",
    "import batcher.cli",
)
TARGET_S = 0.2
TARGETED = ("import batcher.errors", "import batcher.mock_server")
HEAVY = ("pandas", "pyarrow", "aiohttp", "numpy")

# Runs in the child: time the statement, then report which heavy libraries it loaded.
PROBE = """
import sys, time
started = time.perf_counter()
exec({statement!r})
elapsed = time.perf_counter() - started
print(elapsed, ",".join(name for name in {heavy!r} if name in sys.modules) or "-")
"""


def measure(statement: str) -> tuple[float, str, list[tuple[str, float]]]:
    """One fresh interpreter: seconds, heavy libraries loaded, top-level imports by cost."""
    probe = PROBE.format(statement=statement, heavy=HEAVY)
    result = subprocess.run([PYTHON, "-X", "importtime", "-c", probe], cwd=REPO,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"{statement!r} failed: {result.stderr[-1500:]}")
    seconds, loaded = result.stdout.split()
    return float(seconds), loaded, top_level_imports(result.stderr)


def top_level_imports(importtime: str) -> list[tuple[str, float]]:
    """The imports ``-X importtime`` lists at the outermost level, with cumulative seconds."""
    found = []
    for line in importtime.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if not name.startswith("  ") and name.strip():  # one space after the bar: outermost
            found.append((name.strip(), int(parts[1]) / 1e6))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--repeat", type=int, default=7, help="fresh interpreters per statement")
    args = parser.parse_args(argv)
    meter = print_header("import time")
    rows = []
    targets = []
    try:
        _seconds, _loaded, startup = measure("pass")
        at_startup = {name for name, _seconds in startup}
        for statement in STATEMENTS:
            runs = [measure(statement) for _ in range(args.repeat)]
            times = [seconds for seconds, _loaded, _top in runs]
            median = statistics.median(times)
            _seconds, loaded, top = runs[-1]
            heaviest = sorted((item for item in top if item[0] not in at_startup),
                              key=lambda item: item[1], reverse=True)[:3]
            rows.append((statement, median, min(times),
                         ", ".join(f"{name} {seconds:.3f}" for name, seconds in heaviest),
                         loaded))
            if statement in TARGETED:
                targets.append((f"{statement} < {TARGET_S:g} s", f"{median:.3f} s median",
                                median < TARGET_S))
    except BenchError as error:
        print(f"import_time: benchmark failed: {error}", file=sys.stderr)
        print(meter.report())
        return 1
    print(f"{args.repeat} fresh interpreters per statement; seconds for the statement alone")
    print_table(["statement", "median s", "min s", "heaviest top-level imports (s, one run)",
                 "heavy libraries loaded"], rows)
    print_targets(targets)
    print(meter.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
