"""The authors' sampling on the paper's `mnist` setting: time, evaluations of g, inverse error.

Runs the authors' PyTorch code (rtqichen/residual-flows, commit 8170138) in an environment with
PyTorch, for a side-by-side comparison with `benchmarks/solver.py --models mnist` (this package's
`mnist` preset, the same architecture) on the same machine in the same hour:

    python -m venv authors-venv && authors-venv/bin/pip install torch==2.13.0 numpy
    git clone https://github.com/rtqichen/residual-flows && git -C residual-flows checkout 8170138
    authors-venv/bin/python benchmarks/authors_sampling.py --authors-repo residual-flows

The model is `train_img.py`'s for `--data mnist --imagesize 28 --actnorm True` (the paper's
command) with the script's defaults: blocks 16-16-16, 512 channels, kernels 3-1-3, LipSwish,
coefficient 0.98, 4 FC blocks of 128 at the end, logit transform with alpha 1e-6; batch 64.
ActNorm initialises on a first forward pass over random dequantised images (as their first
training step does); nothing is trained (as `solver.py`'s `mnist` model). The inverse is the
authors' `_inverse_fixed_point`: per block, x <- y - g(x) from x = y - g(y) until every element's
last step satisfies step**2 < atol + rtol * |y| over the whole batch (atol = rtol = 1e-5: steps
below about 3e-3), then x is returned. Reported:

    sample (s)      `model(z, inverse=True)` for 64 latents, median of `--repeats` calls after a
                    first one (PyTorch runs eagerly; the first call is timed too)
    g per block     evaluations of `g` per block in one call (a forward hook on each `nnet`)
    inverse error   max |model(x) - z|: the latents recovered from the samples through the
                    explicit direction against the drawn ones

Prints the row and writes `benchmarks/results/authors_sampling.json` (or `--output`). Not part
of `run_all.py` or the tests: it needs PyTorch and the authors' code.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "authors_sampling.json"


def build_mnist_model(num_samples: int):  # noqa: ANN201 (a torch module; torch is optional)
    """The authors' `ResidualFlow` for MNIST as `train_img.py` builds it."""
    from resflows import layers
    from resflows.resflow import ResidualFlow

    return ResidualFlow(
        (num_samples, 1, 28, 28),
        n_blocks=[16, 16, 16],
        intermediate_dim=512,
        factor_out=False,
        quadratic=False,
        init_layer=layers.LogitTransform(1e-6),
        actnorm=True,
        fc_actnorm=False,
        batchnorm=False,
        dropout=0.0,
        fc=False,
        coeff=0.98,
        vnorms="2222",
        n_lipschitz_iters=None,
        sn_atol=1e-3,
        sn_rtol=1e-3,
        n_power_series=None,
        n_dist="poisson",
        n_samples=1,
        kernels="3-1-3",
        activation_fn="swish",
        fc_end=True,
        fc_idim=128,
        n_exact_terms=2,
        preact=True,
        neumann_grad=True,
        grad_in_forward=True,
        first_resblock=True,
        learn_p=False,
        classification=False,
        block_type="resblock",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="their checkout")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.authors_repo.resolve()))
    import torch
    from resflows.layers.iresblock import iResBlock

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n = args.num_samples
    model = build_mnist_model(n)
    pixels = torch.randint(0, 256, (n, 1, 28, 28)).float()
    model.train()
    with torch.no_grad():
        model((pixels + torch.rand_like(pixels)) / 256.0)  # ActNorm's data-dependent start
    model.eval()

    blocks = [m for m in model.modules() if isinstance(m, iResBlock)]
    counts = [0] * len(blocks)

    def counter(index: int):  # noqa: ANN202
        def hook(*_: object) -> None:
            counts[index] += 1

        return hook

    for index, block in enumerate(blocks):
        block.nnet.register_forward_hook(counter(index))

    z = torch.randn(n, 28 * 28)
    times = []
    with torch.no_grad():
        for _ in range(1 + args.repeats):
            counts[:] = [0] * len(blocks)
            start = time.perf_counter()
            x = model(z, inverse=True)
            times.append(time.perf_counter() - start)
        per_block = list(counts)
        back = model(x).reshape(n, -1)
    row = {
        "model": "mnist (the authors' code, untrained)",
        "solver": "authors' fixed point",
        "tolerance": "step**2 < 1e-5 + 1e-5 |y|",
        "g_per_block_mean": round(statistics.mean(per_block), 1),
        "g_per_block_max": max(per_block),
        "blocks": len(blocks),
        "sample_seconds": round(statistics.median(times[1:]), 3),
        "first_sample_seconds": round(times[0], 3),
        "reconstruction_error": float((back - z).abs().max()),
        "samples_finite": bool(torch.isfinite(x).all()),
    }
    print(json.dumps(row, indent=1))
    result = {
        "command": "python benchmarks/authors_sampling.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"processor": platform.processor(), "torch": torch.__version__},
        "rows": [row],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
