"""Tests of the `train_tf.py` command line: artefacts, modes, crash recovery, distribution."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from module_runs import tests_of_this_module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_tf  # noqa: E402
from tfp_resflow.layers import lipschitz  # noqa: E402
from tfp_resflow.layers.norm_order import NormOrder  # noqa: E402
from tfp_resflow.models.hybrid import HybridFlowModel  # noqa: E402
from tfp_resflow.training import evaluation, train_config  # noqa: E402

# A toy run small enough to trace and train in seconds.
TINY_TOY = [
    "--dataset",
    "8gaussians",
    "--model",
    "num_blocks=2",
    "hidden_units=8,8",
    "--batch-size",
    "32",
    "--num-samples",
    "64",
    "--num-eval-draws",
    "2",
    "--warmup-steps",
    "2",
    "--verbose",
    "0",
]
# The `digits` preset with one block per scale and one fully connected block (4, 4 and 2 in the
# preset): every part of an image flow, traced in a third of the time. The 297 test digits are
# evaluated in one batch, so the evaluation traces once (not for 200 and for 97 examples).
TINY_DIGITS = [
    "--dataset",
    "digits",
    "--preset",
    "digits",
    "--model",
    "blocks_per_scale=1,1",
    "fc_end_blocks=1",
    "--eval-batch-size",
    "300",
    "--batch-size",
    "16",
    "--num-samples",
    "4",
    "--num-eval-draws",
    "2",
    "--warmup-steps",
    "2",
    "--verbose",
    "0",
]


def run_cli(args, env=None, timeout=600):
    """Runs train_tf.py in a fresh Python process (needed for devices, workers and SIGKILL)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train_tf.py"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------
# Flags


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--preset",
        "--epochs",
        "--steps-per-epoch",
        "--batch-size",
        "--learning-rate",
        "--output-dir",
        "--seed",
        "--strategy",
        "--resume",
        "--eval-only",
        "--sample",
    ):
        assert flag in out, flag


def _learnable_layers(model):
    model.build((None, *model.event_shape))
    return [
        isinstance(layer.domain, NormOrder)
        for layer in lipschitz.spectral_layers(model.flow_layers)
    ]


@pytest.mark.parametrize(
    ("args", "event_shape", "num_levels"),
    # The toy preset's CLipSwish is 1-Lipschitz in l2 only: learnable orders take LipSwish.
    [
        (["--dataset", "8gaussians", "--model", "activation=lipswish"], (2,), None),
        ([], (8, 8, 1), 17),
    ],
    ids=["toy", "digits"],
)
def test_learnable_norm_orders_flag_reaches_every_layer(args, event_shape, num_levels):
    config, _ = train_tf.parse_args(args)
    assert train_config.model_config(config).learnable_norm_orders is False
    assert not any(_learnable_layers(train_config.build_model(config, event_shape, num_levels)))
    config, _ = train_tf.parse_args([*args, "--model", "learnable_norm_orders=true"])
    assert train_config.model_config(config).learnable_norm_orders is True
    learnable = _learnable_layers(train_config.build_model(config, event_shape, num_levels))
    assert learnable
    assert all(learnable)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "imagenet1k"], "unknown preset 'imagenet1k'"),
        (["--dataset", "8gaussians", "--preset", "mnist"], "does not fit dataset"),
        (["--batch-size", "0"], "batch_size must be a positive integer; got 0"),
        (["--batch-size", "-3"], "batch_size must be a positive integer; got -3"),
        (["--strategy", "horovod"], "strategy must be one of"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--model", "hidden_channel=3"], "unknown ImageFlowConfig field(s) ['hidden_channel']"),
        (["--model", "hidden_channels=x"], "hidden_channels must be an integer; got 'x'"),
        (["--model", "hidden_channels=0"], "ImageFlowConfig.hidden_channels must be an integer"),
        (["--model", "solver=newton"], "BlockConfig.solver must be one of ('plain', 'anderson')"),
        (["--model", "blocks_per_scale"], "expected name=value; got 'blocks_per_scale'"),
        (["--dataset", "moons", "--model", "hidden_channels=4"], "unknown ResidualFlowConfig"),
        (["--task", "regression"], "task must be one of ('density', 'classification', 'hybrid')"),
        (["--dataset", "moons", "--task", "hybrid"], "the toy set 'moons' has none"),
        (["--task", "hybrid", "--nll-weight", "-1"], "nll_weight must be a number >= 0"),
        (["--task", "hybrid", "--nll-weight", "half"], "nll_weight must be a number >= 0"),
        (["--context", "class"], "context must be one of ('none', 'label')"),
        (["--dataset", "moons", "--context", "label"], "context 'label' needs labels"),
        (["--context", "label", "--task", "hybrid"], "models p(x | label) with task 'density'"),
        (["--context", "label", "--preset", "idensenet_mnist"], "'resnet' with a context_size"),
    ],
)
def test_bad_flags_exit_nonzero_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert err.startswith("train_tf.py: error:")


@pytest.mark.parametrize(
    ("task", "nll_weight", "expected"),
    [("density", "1", None), ("classification", "1", 0.0), ("hybrid", "1/D", 1 / 64)],
)
def test_task_flag_builds_the_model(task, nll_weight, expected):
    config, _ = train_tf.parse_args(["--task", task, "--nll-weight", nll_weight])
    model = train_config.build_model(config, (8, 8, 1), 17)
    assert isinstance(model, HybridFlowModel) == (expected is not None)
    if expected is not None:
        assert model.num_classes == 10
        assert model._nll_weight == pytest.approx(expected)


def test_a_class_conditional_run_samples_one_row_per_class(tmp_path):
    run = tmp_path / "conditional"
    args = [*TINY_DIGITS, "--context", "label", "--epochs", "1", "--steps-per-epoch", "2"]
    assert train_tf.main([*args, "--num-samples", "20", "--output-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["context"] == "label"
    assert config["model_config"]["context_size"] == 10
    assert np.isfinite(read_metrics(run)["epochs"][-1]["test_bits_per_dim"])
    model = keras.models.load_model(run / "model.keras")
    assert model.context_shape == (10,)
    # 20 samples: 2 per class, a row of 2 (8x8 digits scaled 8x, 1-pixel borders) per class.
    picture = tf.io.decode_png(tf.io.read_file(str(run / "samples.png")))
    assert picture.shape[:2] == (8 * (10 * 9 + 1), 8 * (2 * 9 + 1))
    assert train_tf.main([*args, "--output-dir", str(run), "--sample", "3"]) == 0
    picture = tf.io.decode_png(tf.io.read_file(str(run / "samples_3.png")))
    assert picture.shape[:2] == (8 * (10 * 9 + 1), 8 * (3 * 9 + 1))


def test_a_hybrid_run_reports_test_accuracy(tmp_path):
    run = tmp_path / "hybrid"
    args = [*TINY_DIGITS, "--task", "hybrid", "--epochs", "1", "--steps-per-epoch", "3"]
    assert train_tf.main([*args, "--output-dir", str(run)]) == 0
    entry = read_metrics(run)["epochs"][-1]
    assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert np.isfinite(entry["test_bits_per_dim"])
    assert isinstance(keras.models.load_model(run / "model.keras"), HybridFlowModel)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "blocks_per_scale=4,4", "hidden_channels=64"], {"hidden_channels": 64}),
        (["--model", "solver=anderson", "--model", "atol=1e-5"], {"solver": "anderson"}),
        (["--dataset", "moons", "--model", "hidden_units=16,16"], {"hidden_units": (16, 16)}),
        (["--model", "logit_alpha=none", "num_exact_terms=4"], {"logit_alpha": None}),
    ],
)
def test_model_flag_sets_any_model_config_field(args, expected):
    config, _ = train_tf.parse_args(args)
    model = train_config.model_config(config)
    for name, value in expected.items():
        holder = model if hasattr(model, name) else model.block
        assert getattr(holder, name) == value
    if "--model" in args and "atol=1e-5" in args:
        assert model.block.atol == 1e-5
    if "num_exact_terms=4" in args:
        assert model.block.num_exact_terms == 4


def unknown_dataset_run(runs, directory):
    """train_tf.py with a dataset that does not exist (its `subprocess.CompletedProcess`)."""
    return run_cli(["--dataset", "no_such_dataset_xyz", "--output-dir", "/tmp/never"])


def test_unknown_dataset_fails_with_one_line_in_a_subprocess(background):
    result = background.result("unknown-dataset")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_tf.py")]
    assert len(errors) == 1, result.stderr


# ------------------------------------------------------------------------------------------------
# Artefacts and run modes


def test_digits_smoke_run_writes_every_artefact(tmp_path):
    run = tmp_path / "digits"
    assert (
        train_tf.main(
            [*TINY_DIGITS, "--epochs", "2", "--steps-per-epoch", "2", "--output-dir", str(run)]
        )
        == 0
    )
    for name in ("config.json", "metrics.json", "samples.png", "model.keras", "resume.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_001.weights.h5",
        "epoch_002.weights.h5",
    ]
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((run / "logs" / "eval").glob("events.out.tfevents.*"))
    metrics = read_metrics(run)
    assert metrics["unit"] == "bits_per_dim"
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for entry in metrics["epochs"]:
        assert np.isfinite(entry["train_bits_per_dim"])
        # 17 grey levels: a useless model is far above log2(17) = 4.09 bits, a good one below.
        assert 0.0 < entry["test_bits_per_dim"] < 20.0
        assert entry["estimator"]["train_mode_std"] > 0.0
        # Every block certified below 1 after the evaluation's converged power iterations.
        assert 0.0 < entry["certified_lipschitz_max"] < 1.0
        assert entry["uncertified_blocks"] == []
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "digits"

    # --sample N writes N samples.
    assert train_tf.main([*TINY_DIGITS, "--output-dir", str(run), "--sample", "9"]) == 0
    assert (run / "samples_9.png").exists()


def test_toy_run_eval_only_and_resume(tmp_path):
    run = tmp_path / "toy"
    assert (
        train_tf.main(
            [*TINY_TOY, "--epochs", "2", "--steps-per-epoch", "3", "--output-dir", str(run)]
        )
        == 0
    )
    assert (run / "density.png").exists()
    metrics = read_metrics(run)
    assert metrics["unit"] == "nats"
    # --eval-only reproduces the last test NLL of the same checkpoint and EMA weights (2-D
    # events are evaluated with exact log-dets: deterministic).
    assert train_tf.main([*TINY_TOY, "--output-dir", str(run), "--eval-only"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["checkpoint_epoch"] == 2
    np.testing.assert_allclose(
        evaluation["test_nats"], metrics["epochs"][-1]["test_nats"], rtol=1e-5
    )
    # --resume continues from epoch 2 to 3, keeping the history.
    assert (
        train_tf.main(
            [
                *TINY_TOY,
                "--epochs",
                "3",
                "--steps-per-epoch",
                "3",
                "--output-dir",
                str(run),
                "--resume",
            ]
        )
        == 0
    )
    assert [e["epoch"] for e in read_metrics(run)["epochs"]] == [1, 2, 3]
    assert json.loads((run / "resume.json").read_text())["initial_epoch"] == 2


def test_eval_only_without_checkpoint_fails_cleanly(tmp_path, capsys):
    code = train_tf.main([*TINY_TOY, "--output-dir", str(tmp_path / "empty"), "--eval-only"])
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Crash recovery


def weights_checksum_of_backup(run_dir, config_args):
    """The backup a resumed run restores: (weights checksum, optimizer iterations, epoch).

    As Keras' `BackupAndRestore(double_checkpoint=True)`: if the kill interrupted the writing
    of `latest.weights.h5`, the previous backup (`*.bkp`, weights and metadata) is used.
    """
    from tfp_resflow.data import datasets

    config, _ = train_tf.parse_args([*config_args])
    train, event_shape, num_levels = datasets.load_dataset(
        config.dataset, "train", batch_size=config.batch_size, seed=config.seed
    )
    init_batch = next(iter(train))
    model = train_config.compiled_model(config, tuple(event_shape), num_levels, init_batch, 100)
    backup = Path(run_dir) / "backup"
    suffix = ""
    try:
        model.load_weights(backup / "latest.weights.h5")
    except OSError:  # a half-written file
        suffix = ".bkp"
        # Keras loads only files named *.weights.h5; it copies the .bkp back before loading too.
        previous = Path(run_dir) / "previous_backup.weights.h5"
        shutil.copyfile(backup / f"latest.weights.h5{suffix}", previous)
        model.load_weights(previous)
    epoch = json.loads((backup / f"training_metadata.json{suffix}").read_text())["epoch"]
    return (
        evaluation.weights_checksum(model.weights),
        int(model.optimizer.iterations.numpy()),
        epoch,
    )


CRASH_ARGS = [*TINY_TOY, "--epochs", "6", "--steps-per-epoch", "10", "--backup-every", "5"]


def killed_run(runs, directory):
    """A run killed (SIGKILL) once a backup from the middle of the run exists (after epoch 2 has
    begun): the crash that each crash-recovery test resumes, each from its own copy."""
    run = directory / "crash"
    process = runs.popen([*CRASH_ARGS, "--output-dir", str(run)], directory / "crash.log")
    metadata = run / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    # Kill once a backup from the middle of the run exists (after epoch 2 has begun).
    while time.time() < deadline and not runs.closed:
        if metadata.exists():
            try:
                if json.loads(metadata.read_text())["epoch"] >= 2:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if process.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("half_written", [False, True], ids=["latest", "half-written-latest"])
def test_killed_run_resumes_from_its_backup(background, tmp_path, half_written):
    # half_written: the kill cut the latest backup short (it happens by chance in the plain
    # case too); the run must fall back to the previous one (double_checkpoint=True).
    run = tmp_path / "crash"
    # A copy of the killed run (a resume reads no path from the run's files).
    shutil.copytree(background.result("killed"), run)
    args = [*CRASH_ARGS, "--output-dir", str(run)]
    assert not (run / "model.keras").exists()  # it really did not finish
    if half_written:
        assert (run / "backup" / "latest.weights.h5.bkp").exists()  # a second backup was made
        latest = run / "backup" / "latest.weights.h5"
        latest.write_bytes(latest.read_bytes()[:1000])
    expected_checksum, backup_iterations, backup_epoch = weights_checksum_of_backup(run, args)

    # The same command again (in this process: the resume needs no fresh one).
    assert train_tf.main(args) == 0
    resume = json.loads((run / "resume.json").read_text())
    # The previous backup may come from before epoch 2 began.
    assert resume["initial_epoch"] == backup_epoch >= (1 if half_written else 2)
    assert resume["optimizer_iterations"] == backup_iterations > 0
    np.testing.assert_allclose(resume["weights_checksum"], expected_checksum, rtol=1e-6)
    assert [e["epoch"] for e in read_metrics(run)["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert (run / "model.keras").exists()


# ------------------------------------------------------------------------------------------------
# Distribution

# The toy preset's CLipSwish is 1-Lipschitz in l2 only: learnable orders take LipSwish.
NORM_ORDERS = {
    "fixed": [],
    "learnable": ["--model", "learnable_norm_orders=true", "activation=lipswish"],
}


def mirrored_runs(orders):
    """The same run with the default and with the mirrored strategy on 2 logical CPUs, at once
    (one process per core): `{strategy: (exit status, run directory, log)}`."""
    common = [
        *TINY_TOY,
        "--model",
        "log_det=exact",
        "--epochs",
        "3",
        "--steps-per-epoch",
        "4",
        "--warmup-steps",
        "0",
        "--learning-rate",
        "0.01",
        *NORM_ORDERS[orders],  # learnable: the order gradient is summed over replicas likewise
    ]

    def run(runs, directory):
        processes = {}
        for strategy in ("default", "mirrored"):
            out = directory / strategy
            args = [*common, "--strategy", strategy, "--cpu-devices", "2", "--output-dir", str(out)]
            processes[strategy] = runs.popen(args, directory / f"{strategy}.log")
        return {
            strategy: (
                process.wait(timeout=600),
                directory / strategy,
                directory / f"{strategy}.log",
            )
            for strategy, process in processes.items()
        }

    return run


@pytest.mark.slow
@pytest.mark.parametrize("orders", list(NORM_ORDERS))
def test_mirrored_on_two_cpus_matches_the_default_strategy(background, orders):
    # With exact log-dets the loss is deterministic, so both runs compute the same function of
    # the same global batches; only the order of float32 sums differs (per-replica partial sums,
    # all-reduced), about 1e-7 relative per operation. Over 12 steps that stays far below
    # 1e-4 relative, while a wrong gradient scaling (sum instead of mean over replicas) or a
    # different data split would change the loss at the first or second decimal.
    losses = {}
    for strategy, (code, run, log) in background.result(f"mirrored-{orders}").items():
        assert code == 0, log.read_text()[-2000:]
        losses[strategy] = [e["train_nats"] for e in read_metrics(run)["epochs"]]
    assert len(losses["default"]) == 3
    np.testing.assert_allclose(losses["mirrored"], losses["default"], rtol=1e-4)
    assert losses["default"][0] != losses["default"][-1]  # it trained


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def multiworker_runs(runs, directory):
    """Two workers of a multi-worker run on loopback: (their exit statuses and logs, run dir)."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    run = directory / "mw"
    args = [
        *TINY_TOY,
        "--strategy",
        "multiworker",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "3",
        "--output-dir",
        str(run),
    ]
    processes = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {"TF_CONFIG": json.dumps(task)}
        log = directory / f"worker_{index}.log"
        processes.append((runs.popen(args, log, env), log))
    return [(p.wait(timeout=600), log) for p, log in processes], run


@pytest.mark.slow
def test_multiworker_on_loopback_trains_and_workers_agree(background):
    workers, run = background.result("multiworker")
    for code, log in workers:
        assert code == 0, log.read_text()[-3000:]
    chief = read_metrics(run)
    worker = (
        read_metrics(run / "worker_1") if (run / "worker_1" / "metrics.json").exists() else None
    )
    assert [e["epoch"] for e in chief["epochs"]] == [1, 2]
    assert worker is None  # only the chief writes metrics
    checksums = [
        json.loads((d / "final_weights.json").read_text()) for d in (run, run / "worker_1")
    ]
    np.testing.assert_allclose(checksums[0], checksums[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The runs in fresh processes, in the background
#
# The tests of a failing start, crash recovery and distribution need train_tf.py in fresh
# processes (a clean exit, SIGKILL, logical devices, workers). Their runs start with this
# module's first test (those of the selected tests), one group after another in a background
# thread, so that they train on the second core while this process runs the other tests on the
# first; each test then waits for its own group.

BACKGROUND_GROUPS = {
    "unknown-dataset": unknown_dataset_run,
    "killed": killed_run,
    **{f"mirrored-{orders}": mirrored_runs(orders) for orders in NORM_ORDERS},
    "multiworker": multiworker_runs,
}


class BackgroundRuns:
    """Groups of train_tf.py processes (`BACKGROUND_GROUPS`), one group at a time."""

    def __init__(self, root):
        self.root = root
        self.closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._futures = {}
        self._processes = []

    def start(self, name):
        """Queues the group `name` (once)."""
        if name not in self._futures:
            directory = self.root / name
            directory.mkdir()
            self._futures[name] = self._pool.submit(BACKGROUND_GROUPS[name], self, directory)

    def result(self, name):
        """The group's result, once it has run (an error in it is raised here)."""
        self.start(name)
        return self._futures[name].result()

    def popen(self, args, log, env=None):
        """Starts train_tf.py with `args` in a fresh process, its output to the file `log`."""
        if self.closed:
            raise RuntimeError("the background runs were stopped")
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        with open(log, "w") as out:  # the child keeps its own handle
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "train_tf.py"), *args],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._processes.append(process)
        return process

    def close(self):
        """Stops what is still queued or running."""
        self.closed = True
        for future in self._futures.values():
            future.cancel()
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self._pool.shutdown(wait=True)


def _groups_of(item):
    """The background groups a collected test of this module waits for."""
    name = item.originalname
    if name == "test_unknown_dataset_fails_with_one_line_in_a_subprocess":
        return ["unknown-dataset"]
    if name == "test_killed_run_resumes_from_its_backup":
        return ["killed"]
    if name == "test_mirrored_on_two_cpus_matches_the_default_strategy":
        return [f"mirrored-{item.callspec.params['orders']}"]
    if name == "test_multiworker_on_loopback_trains_and_workers_agree":
        return ["multiworker"]
    return []


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Starts the background groups of this module's selected tests, in their order (unless
    pytest-xdist's `--dist load` spreads the module's tests over workers: then each group
    starts when a test asks for it)."""
    runs = BackgroundRuns(tmp_path_factory.mktemp("background"))
    for item in tests_of_this_module(request):
        for name in _groups_of(item):
            runs.start(name)
    yield runs
    runs.close()
