"""Runs every benchmark script, each in its own process, and collects their JSON in one place.

Full mode (about 45 minutes on 2 CPU cores, conditional.py about 25 of them; one script at a
time, so timings do not compete):

    compare_flows.py   3 toy sets x (resflow-lipswish, realnvp, maf) + digits x (resflow-lipswish,
                       glow), 3 seeds, equal steps (its equal-seconds `--long` run, hours, is
                       not part of this)
    ablations.py       toy and digits variants, 3 seeds (`--jobs 2`: the two data sets at once)
    estimators.py      bias and spread of the log-det estimators, and estimators.png
    train_step.py      --configs toy digits-authors digits digits-td-loop   (the mnist presets:
                       ~10 min more)
    logdet_memory.py   --terms 2 20                               (both networks)
    solver.py          --models digits --digits-model <compare_flows' seed-0 residual digits
                       model, saved to a scratch directory>       (no 2.5-minute train_tf.py run)
    lipschitz_budget.py --jobs 2   where the blocks' Lipschitz budget goes, per initialiser and
                       activation (about 30-40 minutes more on a loaded machine)
    conditional.py     conditional flows (rotated 8gaussians, two-moons posterior with C2ST,
                       class-conditional digits), 3 seeds, equal steps

The new scripts write `compare_flows.json`, `ablations.json`, `estimators.json` (+ `.png`),
`lipschitz_budget.json`, `conditional.json` (+ `conditional_two_moons.png`) to
`--output-dir` (default `benchmarks/results/`); the three older scripts, run here in reduced
configurations, write `train_step_run_all.json`, `logdet_memory_run_all.json` and
`solver_run_all.json`, so the committed full runs quoted in the README (`train_step.json`,
`logdet_memory.json`) are never overwritten. `run_all.json` records each script's command,
exit status and wall time, and the machine's load average before and after.

Quick mode (`--quick`, about 3 minutes on 2 idle CPU cores): every script in a tiny
configuration (small models, few steps: it checks that each one runs end to end and writes its
results, not what they say), two at a time, into a fresh temporary directory unless
`--output-dir` is given (never the committed results). `tests/test_benchmarks.py` runs it once
and checks every output.

    compare_flows.py --quick (equal steps, and equal seconds: 3 s per model with 2 checkpoints,
    its curves and pictures), conditional.py --quick --budget both (every task and model at
    equal time, each task's residual flow at equal steps), hybrid.py --quick (every flow; the
    full run leaves hybrid.py out: its table takes hours), ablations.py --quick,
    train_step.py --quick --configs digits digits-td-loop --steps 2, solver.py --models digits
    --tolerances 1e-4 --num-samples 8 --repeats 1 --xla off --digits-model <the residual digits
    model compare_flows.py --quick trained>, logdet_memory.py --terms 2 --networks mlp,
    estimators.py --quick, lipschitz_budget.py --quick (one toy variant, 3 steps)

    python benchmarks/run_all.py
    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --quick --output-dir /tmp/bench --only estimators solver

Each script's table is printed when it ends; its stderr goes to a log in a scratch directory,
whose tail is printed if it fails. The exit status is 1 if any script failed.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SCRIPTS = (
    "compare_flows",
    "ablations",
    "estimators",
    "train_step",
    "logdet_memory",
    "solver",
    "lipschitz_budget",
    "conditional",
)
# The quick run also runs benchmarks/hybrid.py (the full run leaves it out: hours on its own).
QUICK_SCRIPTS = (*SCRIPTS, "hybrid")
# Files each script writes (relative to the output directory): what the tests check.
OUTPUTS = {
    "compare_flows": "compare_flows.json",
    "ablations": "ablations.json",
    "estimators": "estimators.json",
    "train_step": "train_step_run_all.json",
    "logdet_memory": "logdet_memory_run_all.json",
    "solver": "solver_run_all.json",
    "lipschitz_budget": "lipschitz_budget.json",
    "conditional": "conditional.json",
    "hybrid": "hybrid.json",
}


@dataclasses.dataclass
class Task:
    name: str
    args: list[str]
    after: tuple[str, ...] = ()
    process: subprocess.Popen | None = None
    start: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(HERE / f"{self.name}.py"), *self.args]


def tasks(*, quick: bool, out: Path, scratch: Path) -> list[Task]:
    model = scratch / "digits_resflow.keras"

    def output(name: str) -> list[str]:
        return ["--output", str(out / OUTPUTS[name])]

    if quick:
        # The longest first, so that the two slots end together.
        return [
            Task(
                "compare_flows",
                ["--quick", *output("compare_flows"), "--save-digits-model", str(model)],
            ),
            Task("conditional", ["--quick", "--budget", "both", *output("conditional")]),
            Task("hybrid", ["--quick", *output("hybrid")]),
            Task("ablations", ["--quick", *output("ablations")]),
            # One process per configuration: the two the tests compare (`toy` only in full),
            # small models.
            Task(
                "train_step",
                [
                    *("--quick", "--configs", "digits", "digits-td-loop", "--steps", "2"),
                    *output("train_step"),
                ],
            ),
            # XLA (`--xla on`, a compilation per setting) only in full: tests/test_bijector.py
            # samples through both solvers with and without it.
            Task(
                "solver",
                [
                    *("--models", "digits", "--tolerances", "1e-4", "--num-samples", "8"),
                    *("--repeats", "1", "--xla", "off", "--digits-model", str(model)),
                    *output("solver"),
                ],
                after=("compare_flows",),
            ),
            # One process per configuration: one series length for both gradients.
            Task(
                "logdet_memory",
                ["--terms", "2", "--networks", "mlp", *output("logdet_memory")],
            ),
            Task("estimators", ["--quick", *output("estimators")]),
            Task("lipschitz_budget", ["--quick", *output("lipschitz_budget")]),
        ]
    return [
        Task("compare_flows", [*output("compare_flows"), "--save-digits-model", str(model)]),
        Task("ablations", ["--jobs", "2", *output("ablations")]),
        Task("estimators", output("estimators")),
        Task(
            "train_step",
            [
                *("--configs", "toy", "digits-authors", "digits", "digits-td-loop"),
                *output("train_step"),
            ],
        ),
        Task("logdet_memory", ["--terms", "2", "20", *output("logdet_memory")]),
        Task(
            "solver",
            ["--models", "digits", "--digits-model", str(model), *output("solver")],
            after=("compare_flows",),
        ),
        Task("lipschitz_budget", ["--jobs", "2", *output("lipschitz_budget")]),
        Task("conditional", output("conditional")),
    ]


def run(todo: list[Task], jobs: int, scratch: Path) -> list[Task]:
    """Runs the tasks, at most `jobs` at once, each after the tasks it depends on."""
    pending, running, done = list(todo), [], []
    names = {t.name for t in todo}
    while pending or running:
        for task in list(pending):
            waits = [a for a in task.after if a in names and a not in {d.name for d in done}]
            if len(running) >= jobs or waits:
                continue
            failed = [d.name for d in done if d.name in task.after and d.returncode]
            pending.remove(task)
            if failed:
                print(f"== {task.name}: skipped ({', '.join(failed)} failed)", flush=True)
                task.returncode = -1
                done.append(task)
                continue
            task.log = scratch / f"{task.name}.log"
            print(f"== {task.name}: {' '.join(task.command[1:])}", flush=True)
            task.start = time.perf_counter()
            task.process = subprocess.Popen(
                task.command,
                cwd=ROOT,
                stdout=(scratch / f"{task.name}.out").open("w"),
                stderr=task.log.open("w"),
                text=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
            running.append(task)
        for task in list(running):
            if task.process.poll() is None:
                continue
            running.remove(task)
            task.seconds = time.perf_counter() - task.start
            task.returncode = task.process.returncode
            stdout = (scratch / f"{task.name}.out").read_text()
            done.append(task)
            status = "ok" if task.returncode == 0 else f"FAILED (exit {task.returncode})"
            print(f"== {task.name}: {status} in {task.seconds:.0f} s\n{stdout}", flush=True)
            if task.returncode:
                tail = task.log.read_text().splitlines()[-30:]
                print("\n".join(f"   {line}" for line in tail), flush=True)
        time.sleep(0.2)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configurations, about 3 minutes")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: benchmarks/results (full) or a new temporary directory (quick)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=QUICK_SCRIPTS,
        help="run only these scripts (hybrid: with --quick only)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="scripts at once (default: 2 quick, 1 full)"
    )
    args = parser.parse_args(argv)
    if not args.quick and set(args.only or ()) - set(SCRIPTS):
        parser.error("hybrid is part of the quick run only (python benchmarks/hybrid.py)")
    out = args.output_dir
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="run_all_quick_")) if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or (2 if args.quick else 1)
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_all_scratch_") as scratch_name:
        scratch = Path(scratch_name)
        todo = tasks(quick=args.quick, out=out, scratch=scratch)
        todo = [t for t in todo if not args.only or t.name in args.only]
        done = run(todo, jobs, scratch)
    total = time.perf_counter() - start
    rows = [
        {
            "script": t.name,
            "command": "python benchmarks/" + " ".join([f"{t.name}.py", *t.args]),
            "seconds": round(t.seconds, 1),
            "returncode": t.returncode,
            "output": OUTPUTS[t.name],
        }
        for t in sorted(done, key=lambda t: QUICK_SCRIPTS.index(t.name))
    ]
    print("| script | seconds | status | output |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        status = "ok" if r["returncode"] == 0 else f"exit {r['returncode']}"
        print(f"| {r['script']} | {r['seconds']:.0f} | {status} | {r['output']} |")
    print(f"total: {total:.0f} s ({'quick' if args.quick else 'full'}, {jobs} at a time)")
    write_results(
        out / "run_all.json",
        __file__,
        argv,
        mode="quick" if args.quick else "full",
        jobs=jobs,
        seconds=round(total, 1),
        load_average_before=load_before,
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        rows=rows,
    )
    return 1 if any(t.returncode for t in done) else 0


if __name__ == "__main__":
    sys.exit(main())
