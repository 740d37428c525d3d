"""Shared pieces of the benchmark scripts: machine facts, timing, peak memory, tables, JSON.

Timings belong here and in the scripts next to it, never in tests. Every script prints the
machine it ran on first, because a number without its machine means nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

K = TypeVar("K")

REPO = Path(__file__).resolve().parent.parent

#: Environment of the memory subprocesses: a fixed mmap threshold makes glibc hand every large
#: freed block (a tensor) back to the kernel at once, so RSS follows the live tensors instead
#: of the allocator's high-water mark, and no earlier call hides a later one's peak.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def add_common_arguments(parser: argparse.ArgumentParser, reps: int) -> None:
    """`--quick`, `--device`, `--reps`, `--warmup`, `--threads` and `--json`."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reps", type=int, default=None, help=f"timed repetitions ({reps})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")


def setup_torch(device: str, threads: int | None) -> torch.device:
    """Apply `--threads` and check that `--device cuda` has a GPU."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here.")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Cores, load, versions and the device name: printed at the top of every table."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = info["cpu"]
    return info


def print_header(title: str, device: torch.device, details: Mapping[str, Any]) -> dict[str, Any]:
    """Print `# title`, then the machine and `details` as a markdown list; return the machine."""
    info = machine_info(device)
    print(f"# {title}\n")
    items = {**info, **details}
    print("\n".join(f"- {key}: {value}" for key, value in items.items()))
    print()
    return info


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of `names` (distribution names), 'missing' where not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a clock read means the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of `fn` took (synchronised on CUDA) and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def interleaved(
    contenders: Mapping[K, Callable[[], Any]],
    reps: int,
    warmup: int,
    device: torch.device,
    after: Callable[[K], None] | None = None,
    progress: bool = True,
) -> tuple[dict[K, list[float]], dict[K, Any]]:
    """Time every contender once per round (A B C A B C ...), warm-up rounds first.

    Returns the timed seconds per contender and each contender's output from its first call
    (for correctness checks). `after(name)` runs untimed after each call (cleanup).
    """
    seconds: dict[K, list[float]] = {name: [] for name in contenders}
    first: dict[K, Any] = {}
    last: dict[K, float] = {}
    for round_ in range(warmup + reps):
        for name, fn in contenders.items():
            elapsed, out = timed(fn, device)
            last[name] = elapsed
            if name not in first:
                first[name] = out
            del out
            if after is not None:
                after(name)
            if round_ >= warmup:
                seconds[name].append(elapsed)
        if progress:
            kind = "warm-up" if round_ < warmup else "rep"
            number = round_ + 1 if round_ < warmup else round_ - warmup + 1
            done = ", ".join(f"{n} {s:.3g}s" for n, s in last.items())
            print(f"  [{kind} {number}] {done}", file=sys.stderr, flush=True)
    return seconds, first


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else float("nan")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, payload: Mapping[str, Any], quiet: bool = False) -> None:
    """Write `payload` to `path` (if given) as indented JSON, atomically."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    partial.replace(path)
    if not quiet:
        print(f"\nwrote {path}")


# -- peak memory ------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss() -> int:
    """Peak RSS in bytes: VmHWM (resettable) where Linux has it, else `ru_maxrss`."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_extra_memory(fn: Callable[[], Any], device: torch.device, warmup: bool = True) -> int:
    """Peak bytes `fn` needs above what is allocated before it (RSS on CPU, allocator on CUDA).

    Call in a fresh process that holds only the model and inputs. With `warmup`, `fn` runs once
    first (lazy allocations, persistent state such as `.grad` stay counted, since the baseline
    is taken before the warm-up) and the peak mark is reset before the measured call.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        if warmup:
            fn()
            gc.collect()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    base = current_rss()
    if warmup:
        fn()
        gc.collect()
    if not reset_peak_rss() and warmup:
        print("note: cannot reset the peak RSS mark; peak includes the warm-up", file=sys.stderr)
    fn()
    return max(0, peak_rss() - base)


def run_memory_subprocess(argv: Sequence[str], timeout: float = 3600) -> dict[str, Any]:
    """Run `python <argv>` in a fresh process with `MEMORY_ENV`; parse its last stdout line."""
    import subprocess

    env = {**os.environ, **MEMORY_ENV}
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}: " + " / ".join(tail)}
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "no result line"}
    return json.loads(lines[-1])


MIB = 1024 * 1024
