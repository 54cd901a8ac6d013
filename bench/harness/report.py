"""What every benchmark prints: header, tables, targets; its flags and work folder."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson
import pyarrow as pa

from harness import REPO, BenchError
from harness.load import LoadMeter


def machine_facts() -> list[tuple[str, str]]:
    """What the figures depend on: cores, CPU, Python, batcher and key libraries."""
    import aiohttp

    from batcher import __version__

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        ("batcher tree", git_state()),
        ("nproc", str(os.cpu_count())),
        ("cpu", cpu),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("batcher", __version__),
        ("libraries", f"aiohttp {aiohttp.__version__}, pyarrow {pa.__version__}, "
                      f"orjson {orjson.__version__}"),
    ]


def git_state() -> str:
    """The commit measured and whether batcher's sources differ from it."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                check=False)
        return result.stdout.rstrip("\n")

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "batcher").splitlines()
    if not changed:
        return f"{commit} (batcher/ clean)"
    names = ", ".join(line[3:].removeprefix("batcher/") for line in changed)
    return f"{commit} + uncommitted changes in batcher/: {names}"


def print_header(title: str) -> LoadMeter:
    """Print the benchmark's name, the exact command line and the machine facts;
    returns a meter of the machine's load from now on."""
    command = shlex.join([sys.executable, *sys.argv])
    print(f"== {title} ==")
    print(f"command: (cd {shlex.quote(str(Path.cwd()))} && {command})")
    for key, value in machine_facts():
        print(f"{key}: {value}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(flush=True)
    return LoadMeter()



def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, left-aligned text table (copies cleanly into Markdown code blocks)."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
              .rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print(flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(met: bool) -> str:
    """How a target line reads: a measurement, so a miss is reported, not raised."""
    return "met" if met else "MISSED"


def print_targets(targets: Sequence[tuple[str, str, bool]]) -> None:
    """Print ``(target, measured, met)`` lines."""
    print("targets:")
    print_table(["target", "measured", "result"],
                [(name, measured, verdict(met)) for name, measured, met in targets])


def small_flag(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--small`` switch every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--small", action="store_true",
                        help="CI mode: smaller sizes, all four benchmarks in well under 2 min")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (inputs, jobs, checkpoints, results)")
    return parser


@contextlib.contextmanager
def work_folder(keep: bool, prefix: str) -> Iterator[Path]:
    """A scratch folder under the system temp dir, removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix=f"batcher-bench-{prefix}-"))
    try:
        yield folder
    finally:
        if keep:
            print(f"work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)



def bench_main(name: str, title: str, keep: bool,
               body: Callable[[Path], Callable[[], None] | None]) -> int:
    """Run one benchmark's ``body`` in a work folder: header, figures, machine load.

    ``body`` may return a function that prints the final tables once the
    work folder is gone; a ``BenchError`` (the run itself failed) exits 1.
    """
    meter = print_header(title)
    try:
        with work_folder(keep, name) as folder:
            finish = body(folder)
    except BenchError as error:
        print(f"{name}: benchmark failed: {error}", file=sys.stderr)
        print(meter.report())
        return 1
    if finish is not None:
        print()
        finish()
    print(meter.report())
    return 0
