"""What the benchmark scripts share: resident memory, one worker process per configuration,
the markdown table and the results file (the scripts import it as a sibling:
`python benchmarks/<script>.py`)."""

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (`ru_maxrss` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size of this process now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(script: str, worker_args: list[str]) -> dict:
    """Runs `python script --worker *worker_args` in a fresh process (so its peak memory is
    its own) and returns the JSON object printed on its last line."""
    out = subprocess.run(
        [sys.executable, script, "--worker", *worker_args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(output: Path, script: str, argv: list[str] | None, **results: object) -> None:
    """Writes the command, the machine and `results` as JSON to `output`."""
    command = f"python benchmarks/{Path(script).name} " + " ".join(argv or sys.argv[1:])
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    output.write_text(
        json.dumps({"command": command, "machine": machine, **results}, indent=2) + "\n"
    )
    print(f"wrote {output}")


def print_table(columns: list[str], rows: list[list[object]]) -> None:
    """Prints a markdown table: a header of `columns`, then one line per row of cells."""
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def save_figure(fig, path: Path) -> None:
    """Writes a matplotlib figure as the benchmarks' PNGs (110 dpi), closes it, says where."""
    import matplotlib.pyplot as plt  # the benchmarks' only plotting dependency, imported late

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
