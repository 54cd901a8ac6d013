"""Run every benchmark one after another and print every figure.

Each benchmark runs as its own process (they must not share the machine's
two cores with each other); their output is passed through as it comes,
then the target tables are repeated together at the end with how long each
benchmark took. Exits non-zero only when a benchmark could not run; a
missed target is a measurement, not a failure.

Usage: ``python bench/run_all.py [--small] [--profile]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("utilization", "pacing_virtual", "overhead", "memory", "resume", "rerun",
              "sharing", "ray_utilization")
PROFILED = ("overhead", "resume")


def run(name: str, flags: list[str]) -> tuple[int, float, list[str]]:
    """Run one benchmark, echoing its output; returns exit code, seconds and its lines."""
    command = [sys.executable, str(HERE / f"{name}.py"), *flags]
    started = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    return process.returncode, time.monotonic() - started, lines


def targets_section(lines: list[str]) -> list[str]:
    """The ``targets:`` table a benchmark printed, then its machine-load line."""
    section = []
    if "targets:" in lines:
        for line in lines[lines.index("targets:") + 1:]:
            if not line.strip():
                break
            section.append(line)
    section += [line for line in lines if line.startswith("machine load")]
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--small", action="store_true", help="CI sizes (well under 2 minutes)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile overhead and resume with py-spy")
    args = parser.parse_args(argv)
    outcomes = []
    for name in BENCHMARKS:
        flags = ["--small"] if args.small else []
        if args.profile and name in PROFILED:
            flags.append("--profile")
        code, seconds, lines = run(name, flags)
        outcomes.append((name, code, seconds, targets_section(lines)))
        print(flush=True)
    print("== all benchmarks ==")
    for name, code, seconds, section in outcomes:
        state = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name}: {state}, {seconds:.0f} s")
        for line in section:
            print(f"  {line}")
    total = sum(seconds for _name, _code, seconds, _section in outcomes)
    print(f"total: {total:.0f} s")
    return 0 if all(code == 0 for _name, code, _seconds, _section in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
