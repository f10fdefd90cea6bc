#!/usr/bin/python3
"""PyTorch twins of the bench/bench_*.c workloads: one function per workload,
same shapes, same data layout, same math, timed the same way (warmup, then
per-iteration wall clock, median).

    /usr/bin/python3 bench/torch_twins.py --workload grad_mlp --threads 1 --iters 200
    /usr/bin/python3 bench/torch_twins.py --list
    /usr/bin/python3 bench/torch_twins.py --blas-info
    /usr/bin/python3 bench/torch_twins.py --variants maml_sinusoid
    /usr/bin/python3 bench/torch_twins.py --gemm 128,200,784,0,0 --threads 1

Prints one JSON line: {"workload", "threads", "iters", "torch_ms",
"torch_floor_ms", "torch_blas"}. torch_floor_ms is the same GEMMs as the C
bench's floor, through torch.mm, so BLIS and OpenBLAS can be compared
directly.

Thread pinning: OPENBLAS_NUM_THREADS sets the threads inside each GEMM;
torch.set_num_threads(--intraop, default --threads) those of torch's own
OpenMP pool (bench/run.py sets both, see there).

Adding a workload: write bench/bench_NAME.c and a function here decorated
with @workload("NAME") that returns (step, floor) callables."""

import argparse
import json
import math
import os
import statistics
import sys
import time

WORKLOADS = {}


def workload(name):
    """Registers a twin. The decorated function takes no arguments and
    returns (step, floor): two callables, each one iteration."""

    def reg(fn):
        WORKLOADS[name] = fn
        return fn

    return reg


# --------------------------------------------------------------- MLP (bench/mlp.h)
from twins_mlp import B, H, IN, OUT, SECOND_GEMMS, grad_gemms, nll  # noqa: E402
from twins_mlp import floor as _floor  # noqa: E402


def _mlp_data(torch):
    """Same distributions as bench/mlp.h: N(0,1) inputs, He-initialised
    weights, uniform labels, N(0,1) direction for the HVP. Layout [in, out],
    so the forward is X @ W1, as in the C bench (no transposes anywhere)."""
    g = torch.Generator().manual_seed(42)
    x = torch.randn(B, IN, generator=g)
    w1 = (torch.randn(IN, H, generator=g) * math.sqrt(2.0 / IN)).requires_grad_()
    w2 = (torch.randn(H, OUT, generator=g) * math.sqrt(2.0 / H)).requires_grad_()
    y = torch.randint(0, OUT, (B,), generator=g)
    v1 = torch.randn(IN, H, generator=g)
    v2 = torch.randn(H, OUT, generator=g)
    return x, w1, w2, y, v1, v2


# The GEMMs of bench/mlp.h's mlp_floor_grad and mlp_floor_hvp.
MLP_GRAD_GEMMS = grad_gemms(B)
MLP_HVP_GEMMS = MLP_GRAD_GEMMS + SECOND_GEMMS


@workload("grad_mlp")
def grad_mlp():
    import torch

    x, w1, w2, y, _, _ = _mlp_data(torch)
    grad = torch.autograd.grad

    def step():
        loss = nll(torch, x, (w1, w2), y)
        grad(loss, (w1, w2))

    return step, _floor(torch, MLP_GRAD_GEMMS)


@workload("hvp_mlp")
def hvp_mlp():
    import torch

    x, w1, w2, y, v1, v2 = _mlp_data(torch)
    grad = torch.autograd.grad

    def step():
        # Double backward: the gradient recorded (create_graph), dotted with
        # v, differentiated again, as ad_hvp does on the tape.
        loss = nll(torch, x, (w1, w2), y)
        g1, g2 = grad(loss, (w1, w2), create_graph=True)
        s = (g1 * v1).sum() + (g2 * v2).sum()
        grad(s, (w1, w2))

    return step, _floor(torch, MLP_HVP_GEMMS)


# --------------------------------------------------------------- CNN (bench/bench_train_step_cnn.c)
CB, SIDE, C1, C2, COUT = 64, 28, 16, 32, 10
CFLAT = C2 * 7 * 7


def _cnn_data(torch):
    """examples/mnist_cnn.c's net: Kaiming-normal weights ([out, in, kh, kw]
    and [out, in], as nn_params holds them), zero biases, U[0,1) images,
    uniform labels."""
    g = torch.Generator().manual_seed(42)
    x = torch.rand(CB, 1, SIDE, SIDE, generator=g)
    w1 = (torch.randn(C1, 1, 3, 3, generator=g) * math.sqrt(2.0 / 9)).requires_grad_()
    b1 = torch.zeros(C1, requires_grad=True)
    w2 = (torch.randn(C2, C1, 3, 3, generator=g) * math.sqrt(2.0 / (C1 * 9))).requires_grad_()
    b2 = torch.zeros(C2, requires_grad=True)
    wf = (torch.randn(COUT, CFLAT, generator=g) * math.sqrt(1.0 / CFLAT)).requires_grad_()
    bf = torch.zeros(COUT, requires_grad=True)
    y = torch.randint(0, COUT, (CB,), generator=g)
    return x, [w1, b1, w2, b2, wf, bf], y


# The GEMMs of bench_train_step_cnn.c's floor: per image for the convs
# (im2col + one GEMM per image, as nn_conv2d issues them), once for the fc.
CNN_GEMMS = (
    [(C1, 784, 9, 0, 0), (C2, 196, C1 * 9, 0, 0)] * CB
    + [(CB, COUT, CFLAT, 0, 1), (COUT, CFLAT, CB, 1, 0), (CB, CFLAT, COUT, 0, 0)]
    + [(C1 * 9, 196, C2, 1, 0), (C2, C1 * 9, 196, 0, 1), (C1, 9, 784, 0, 1)] * CB
)


@workload("train_step_cnn")
def train_step_cnn():
    import torch

    F = torch.nn.functional
    x, params, y = _cnn_data(torch)
    w1, b1, w2, b2, wf, bf = params
    grad = torch.autograd.grad
    lr = 0.01

    def step():
        # One SGD step: forward, gradients of the six parameters, in-place
        # update (what nn_opt_step does), as in the C bench.
        # relu after the pool: the same function as relu then pool (max and
        # relu commute) with relu on the 4x smaller tensor, the order an
        # expert writes; the C side runs both as one fused op.
        h = F.relu(F.max_pool2d(F.conv2d(x, w1, b1, padding=1), 2))
        h = F.relu(F.max_pool2d(F.conv2d(h, w2, b2, padding=1), 2))
        loss = F.cross_entropy(F.linear(h.flatten(1), wf, bf), y)
        gs = grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, gs):
                p.sub_(lr * g)

    return step, _floor(torch, CNN_GEMMS)


# --------------------------------------------------------------- twins in their own files
# bench/twins_implicit.py: neumann_K20, cg_K20, maml_sinusoid.
import twins_implicit  # noqa: E402  (bench/ is sys.path[0] when this file runs)

twins_implicit.register(workload)

# bench/twins_unroll.py: unroll_T10, unroll_T50, unroll_T200.
import twins_unroll  # noqa: E402

twins_unroll.register(workload)


# --------------------------------------------------------------- harness


def blas_info():
    """Which BLAS torch.mm really runs: the shared library mapped into this
    process after a matmul, and OpenBLAS's own core name and config."""
    import ctypes

    import torch

    torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    libs = []
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            low = os.path.basename(path).lower()
            if any(s in low for s in ("blas", "blis", "mkl_")) and path not in libs:
                libs.append(path)
    info = {"libs": libs, "torch": torch.__version__}
    for path in libs:
        if "openblas" in os.path.basename(path).lower():
            try:
                lib = ctypes.CDLL(path)
                lib.openblas_get_corename.restype = ctypes.c_char_p
                lib.openblas_get_config.restype = ctypes.c_char_p
                info["openblas_core"] = lib.openblas_get_corename().decode()
                info["openblas_config"] = lib.openblas_get_config().decode().strip()
                lib.openblas_get_num_threads.restype = ctypes.c_int
                info["openblas_threads"] = lib.openblas_get_num_threads()
            except (OSError, AttributeError):
                pass
    if not libs:
        info["summary"] = "no BLAS library mapped (torch built without BLAS?)"
    elif "openblas_core" in info:
        info["summary"] = "OpenBLAS (%s, core %s)" % (
            info["openblas_config"].split()[1] if len(info["openblas_config"].split()) > 1 else "?",
            info["openblas_core"],
        )
    else:
        info["summary"] = os.path.basename(libs[0])
    return info


def time_pair(step, floor, iters, warmup):
    """Alternates step and floor, each timed alone; returns both medians in
    ms (the same scheme as bench_util.h's bu_time_pair)."""
    for _ in range(warmup):
        step()
        floor()
    a, b = [], []
    clock = CLOCK
    for _ in range(iters):
        t0 = clock()
        step()
        t1 = clock()
        floor()
        t2 = clock()
        a.append((t1 - t0) * 1e-6)
        b.append((t2 - t1) * 1e-6)
    return statistics.median(a), statistics.median(b)


# The clock time_pair reads (--clock).
CLOCK = time.perf_counter_ns


def gemm_rates(torch, shapes, threads):
    """GF/s of torch.mm(out=) per shape, the fastest of 8 batches (as
    bench/gemm_rates.c does for ours): JSON lines."""
    from twins_mlp import mm_buffers

    for spec in shapes:
        m, n, k, ta, tb = (int(v) for v in spec.split(","))
        (a, b, c), = mm_buffers(torch, [(m, n, k, ta, tb)])
        mm = torch.mm
        mm(a, b, out=c)
        t0, reps = CLOCK(), 0
        while CLOCK() - t0 < 2.5e6 or reps < 2:
            mm(a, b, out=c)
            reps += 1
        per = max(1, reps * 2)
        best = float("inf")
        for _ in range(8):
            s = CLOCK()
            for _ in range(per):
                mm(a, b, out=c)
            best = min(best, (CLOCK() - s) / per)
        print(json.dumps({"m": m, "n": n, "k": k, "ta": ta, "tb": tb, "threads": threads,
                          "us": round(best * 1e-3, 3),
                          "gflops": round(2.0 * m * n * k / best, 2)}), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--intraop", type=int, default=0,
                    help="torch.set_num_threads value (default: --threads); the BLAS "
                    "threads come from OPENBLAS_NUM_THREADS")
    ap.add_argument("--list", action="store_true", help="print the workload names")
    ap.add_argument("--variants", metavar="NAME",
                    help="print the ways NAME's twin can be written (one a line)")
    ap.add_argument("--variant", help="which way to run the twin (default: its first)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time by process CPU time (one thread only; see bench_util.h)")
    ap.add_argument("--gemm", nargs="+", metavar="m,n,k,ta,tb",
                    help="print GF/s of torch.mm per shape (JSON lines)")
    ap.add_argument("--blas-info", action="store_true", help="print which BLAS torch uses")
    args = ap.parse_args()
    if args.list:
        print("\n".join(WORKLOADS))
        return 0
    if args.variants:
        print("\n".join(getattr(WORKLOADS.get(args.variants), "variants", ("default",))))
        return 0
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time_ns
    import torch

    torch.set_num_threads(args.intraop or args.threads)
    if args.blas_info:
        print(json.dumps(blas_info()))
        return 0
    if args.gemm:
        return gemm_rates(torch, args.gemm, args.threads)
    if args.workload not in WORKLOADS:
        print("unknown workload %r; known: %s" % (args.workload, ", ".join(WORKLOADS)),
              file=sys.stderr)
        return 2
    fn = WORKLOADS[args.workload]
    variants = getattr(fn, "variants", None)
    if args.variant and args.variant != "default" and (not variants or args.variant not in variants):
        print("workload %s has no variant %r (known: %s)" % (args.workload, args.variant,
              ", ".join(variants or ["default"])), file=sys.stderr)
        return 2
    step, floor = fn(args.variant) if variants and args.variant else fn()
    # A slow workload may cap its iterations (step.max_iters / max_warmup,
    # as its C bench does); the JSON reports the count used.
    iters = min(args.iters, getattr(step, "max_iters", args.iters))
    warmup = min(args.warmup, getattr(step, "max_warmup", args.warmup))
    torch_ms, floor_ms = time_pair(step, floor, iters, warmup)
    print(json.dumps({
        "workload": args.workload,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "iters": iters,
        "variant": args.variant or "default",
        "clock": args.clock,
        "torch_ms": round(torch_ms, 4),
        "torch_floor_ms": round(floor_ms, 4),
        "torch_blas": blas_info()["summary"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
