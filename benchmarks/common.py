"""Shared helpers for the side-by-side benchmarks: timing, peak memory, child processes, machine facts, tables.

Rules every benchmark follows (see BENCHMARKS.md):

- **Same weights.** Models are built with random weights by *diffusers* (seeded), saved in diffusers format, and the
  same folder is loaded by both libraries.
- **Interleaved.** Each round runs ours then theirs, the next round theirs then ours, so drifting machine load
  (2 shared cores) hits both sides alike. Warm-up rounds are run and thrown away. Median and min are reported;
  ratios are ours / diffusers of the medians (and of the mins, as a noise check).
- **Fixed threads.** ``torch.set_num_threads`` (and ``OMP_NUM_THREADS`` for child processes) is set once.
- **Peak memory per phase** runs each library's phase in a fresh child process: the child resets the kernel's
  high-water mark (``/proc/self/clear_refs`` <- 5) after its imports, runs the phase and reads ``VmHWM``; the whole
  process peak ``getrusage(RUSAGE_SELF).ru_maxrss`` is reported too. No psutil.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "@@BENCH-RESULT@@ "
OURS, THEIRS = "diffusekit", "diffusers"


# ---------------------------------------------------------------------------------------------------- environment


def quiet_environment(threads: int) -> None:
    """Environment for this process and its children: fixed threads, offline hub, no telemetry or progress noise."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # OpenMP workers that spin while waiting turn an oversubscribed machine (2 cores, load ~10 from other people's
    # test runs) into 10-100x slowdowns: a 2-thread forward of a tiny UNet took 0.2-7 s with the default policy and
    # 0.08 s with PASSIVE. Must be set before torch (libgomp) is loaded; applies to both libraries alike.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # children import diffusekit from the source tree, like this process does
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    if src not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = src + (os.pathsep + path if path else "")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only allowed once, before any parallel work)
        pass


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny configs, 1-2 repeats: checks the harness only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per benchmark (default: per benchmark)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")
    parser.add_argument("--workdir", default=str(REPO / ".bench"),
                        help="where the random-weight checkpoints are saved and reused (default: .bench/, ignored "
                             "by git); checkpoints are rebuilt when their recipe changes")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def selected(args, name: str) -> bool:
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    return not wanted or name in wanted


def run_benchmarks(benchmarks: dict[str, Callable], report: "Report", args) -> None:
    """Run the benchmarks ``--only`` selects (all by default) in order, then write the report."""
    for name, fn in benchmarks.items():
        if selected(args, name):
            print(f"[{name}]", flush=True)
            fn(report, args)
    report.finish()


# ---------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kb() -> int | None:
    """Resident set size now (kB), from /proc/self/status."""
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    """Peak resident set size (kB) since the last :func:`reset_peak_rss`, or since the process started."""
    value = _status_kb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def process_peak_kb() -> int:
    """Peak RSS of the whole process life (kB), ``getrusage(RUSAGE_SELF).ru_maxrss``; never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Stats:
    """Wall-clock seconds of each run, and the process CPU seconds (all threads) of the same runs."""

    times: list[float]
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the samples were."""
        return (max(self.times) - min(self.times)) / self.median if self.median else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "spread": self.spread, "n": len(self.times),
                "times": self.times, "cpu": self.cpu}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    gc.collect()
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def interleaved(cases: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1) -> dict[str, Stats]:
    """Time each callable ``repeat`` times after ``warmup`` untimed calls, alternating the order every round."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    stats = {name: Stats([], []) for name in names}
    for round_ in range(repeat):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = _timed(cases[name])
            stats[name].times.append(wall)
            stats[name].cpu.append(cpu)
    return stats


# ---------------------------------------------------------------------------------------------------- children


def emit(result: dict[str, Any]) -> None:
    """Child side: hand a JSON result to the parent (the last tagged line of stdout wins)."""
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(argv: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process and return the dict it :func:`emit` ted."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=os.environ.copy())
    results = [line[len(RESULT_TAG):] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"child {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(results[-1])


def interleaved_children(cases: dict[str, list[str]], repeat: int, warmup: int = 0,
                         timeout: float = 900) -> dict[str, list[dict[str, Any]]]:
    """Run each case's child ``repeat`` times, alternating the order every round, after ``warmup`` rounds."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            run_child(cases[name], timeout)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(repeat):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            out[name].append(run_child(cases[name], timeout))
    return out


# ---------------------------------------------------------------------------------------------------- facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """Short HEAD, with ``+dirty`` when src/ has uncommitted changes (the code measured is the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=REPO, timeout=10).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "diffusekit_commit": _git_commit(),
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------------- reporting


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def fmt_mib(kb: float) -> str:
    return f"{kb / 1024:.0f} MiB"


class Report:
    """Collects rows ``(benchmark, ours, theirs, ratio, target, note)``; prints a Markdown table; writes JSON."""

    def __init__(self, title: str, args, argv: Iterable[str]):
        self.title = title
        self.args = args
        src = str(REPO / "src")
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
        prefix = f"PYTHONPATH={os.pathsep.join(extra)} " if extra else ""
        self.command = prefix + "python " + " ".join(argv)
        self.info = machine_info(args.threads)
        self.rows: list[dict[str, Any]] = []

    def time_row(self, name: str, stats: dict[str, Stats], target: float | None = 1.0, note: str = "") -> None:
        ours, theirs = stats[OURS], stats[THEIRS]
        cpu_ratio = None
        if ours.cpu and theirs.cpu and theirs.cpu_median:
            cpu_ratio = ours.cpu_median / theirs.cpu_median
        self.rows.append({
            "benchmark": name, "kind": "time", "ours": fmt_time(ours.median), "theirs": fmt_time(theirs.median),
            "ratio": ours.median / theirs.median, "ratio_min": ours.min / theirs.min, "ratio_cpu": cpu_ratio,
            "target": target, "spread": max(ours.spread, theirs.spread), "n": len(ours.times), "note": note,
            "raw": {OURS: ours.as_dict(), THEIRS: theirs.as_dict()},
        })
        self._echo(self.rows[-1])

    def memory_row(self, name: str, ours_kb: list[float], theirs_kb: list[float], target: float | None = 1.0,
                   note: str = "") -> None:
        ours, theirs = statistics.median(ours_kb), statistics.median(theirs_kb)
        self.rows.append({
            "benchmark": name, "kind": "memory", "ours": fmt_mib(ours), "theirs": fmt_mib(theirs),
            "ratio": ours / theirs, "ratio_min": min(ours_kb) / min(theirs_kb), "ratio_cpu": None, "target": target,
            "spread": None, "n": len(ours_kb), "note": note, "raw": {OURS: ours_kb, THEIRS: theirs_kb},
        })
        self._echo(self.rows[-1])

    @staticmethod
    def _echo(row: dict[str, Any]) -> None:
        cpu = "" if row["ratio_cpu"] is None else f"  CPU-time ratio {row['ratio_cpu']:.2f}"
        print(f"  {row['benchmark']}: ours {row['ours']}  diffusers {row['theirs']}  ratio {row['ratio']:.2f}{cpu}"
              f"{'' if row['note'] == '' else '  (' + row['note'] + ')'}", flush=True)

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            f"`{self.command}`",
            "",
            "| benchmark | diffusekit | diffusers | ratio (median) | ratio (min) | ratio (CPU time) | target | met "
            "| spread | n | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            target = "" if r["target"] is None else f"≤ {r['target']:g}"
            met = "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "**no**")
            spread = "" if r["spread"] is None else f"{r['spread'] * 100:.0f}%"
            cpu = "" if r["ratio_cpu"] is None else f"{r['ratio_cpu']:.2f}"
            lines.append(f"| {r['benchmark']} | {r['ours']} | {r['theirs']} | {r['ratio']:.2f} | "
                         f"{r['ratio_min']:.2f} | {cpu} | {target} | {met} | {spread} | {r['n']} | {r['note']} |")
        info = self.info
        lines += ["", f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, torch {info['torch']} "
                      f"({info['torch_threads']} threads), diffusers {info['diffusers']}, transformers "
                      f"{info['transformers']}, accelerate {info['accelerate']}, Python {info['python']}, "
                      f"diffusekit {info['diffusekit_commit']}; load average at start "
                      f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}, at end "
                      f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}."]
        return "\n".join(lines)

    def finish(self) -> None:
        text = self.markdown()
        print("\n" + text + "\n", flush=True)
        if self.args.json:
            data = {"title": self.title, "command": self.command, "machine": self.info, "rows": self.rows,
                    "loadavg_end": os.getloadavg(), "markdown": text}
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- checkpoints


def cached_folder(workdir: str | Path, name: str, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """``workdir/name``, built by ``build(folder)`` unless a folder made from the same ``recipe`` is there."""
    folder = Path(workdir) / name
    stamp = folder / ".recipe.json"
    wanted = json.dumps(recipe, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    print(f"  building {name} (random weights, saved by diffusers) ...", flush=True)
    build(tmp)
    (tmp / ".recipe.json").write_text(wanted)
    tmp.rename(folder)
    print(f"  built {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def max_abs_diff(a, b) -> float:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    if isinstance(b, torch.Tensor):
        b = b.detach().float().cpu().numpy()
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
