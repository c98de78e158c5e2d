"""Run every benchmark script one after the other (never in parallel: they would slow each other down).

    python -m benchmarks.run_all [--quick] [--out .bench/results]

Each script runs in its own process and writes ``OUT/<name>.json`` (raw samples, machine facts, the Markdown table);
the tables are printed at the end. Extra arguments after ``--`` go to every script (e.g. ``-- --threads 1``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .common import REPO

SCRIPTS = ("bench_core", "bench_sd")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs: checks the harness in a few minutes")
    parser.add_argument("--out", default=str(REPO / ".bench" / "results"), help="folder for the JSON results")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated subset of " + ", ".join(SCRIPTS))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    tables = []
    for name in [s.strip() for s in args.scripts.split(",") if s.strip()]:
        result = out / f"{name}{'-quick' if args.quick else ''}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", str(result), *(["--quick"] if args.quick else []),
               *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            failed.append(name)
            continue
        tables.append(json.loads(result.read_text())["markdown"])
    print("\n\n".join(tables))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
