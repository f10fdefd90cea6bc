"""PyTorch twins of bench_unroll_T{10,50,200}.c (bench/unroll_bench.h): the
hypergradient of the validation loss with respect to per-parameter weight
decay by reverse mode through T SGD steps of the 784-200-10 MLP, written the
way a PyTorch user would: torch.autograd.grad(..., create_graph=True) at
every inner step, the update as plain tensor arithmetic, then
torch.autograd.grad(L_val, lam).

bench/torch_twins.py calls register(workload); run one with

    /usr/bin/python3 bench/torch_twins.py --workload unroll_T10 --threads 1

Peak memory (the bench's second column), run as a script:

    /usr/bin/python3 bench/twins_unroll.py --memory [--build-dir build-bench]

prints, per T, our peak_arena_bytes (from the C bench's JSON line) and two
measures of PyTorch's peak, each from one hypergradient in a fresh process:
  torch_live: the peak of live tensor bytes, from the allocator's own
      allocation/free events (torch.profiler with profile_memory=True, the
      CPU allocator stats PyTorch 1.13 offers: kineto "[memory]" events,
      summed in time order); comparable to the arena's bytes in use;
  torch_rss: resource.getrusage maxrss after the call minus the resident
      set before it: what the process really took from the system,
      including the allocator's (glibc malloc's) own overhead and
      fragmentation.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

from twins_mlp import B, IN, OUT, SECOND_GEMMS, V, grad_gemms, weights_and_decay
from twins_mlp import floor as _floor
from twins_mlp import nll as _loss

NB, LR = 8, 0.1


def unroll_gemms(T):
    """unroll_bench.h's ub_floor: per step the 5 GEMMs of loss + gradient,
    for every step but the first the 8 of the backward through that
    gradient, and L_val's gradient at 512."""
    return grad_gemms(B) * T + SECOND_GEMMS * (T - 1) + grad_gemms(V)


def _data(torch):
    """As ub_init: NB training batches of N(0,1) inputs with uniform labels,
    one validation batch of 512, He-initialised W (layout [in, out]),
    lam ~ U[1e-4, 1e-3] shaped like W."""
    g = torch.Generator().manual_seed(42)
    xs = [torch.randn(B, IN, generator=g) for _ in range(NB)]
    ys = [torch.randint(0, OUT, (B,), generator=g) for _ in range(NB)]
    xv = torch.randn(V, IN, generator=g)
    yv = torch.randint(0, OUT, (V,), generator=g)
    w, lam = weights_and_decay(torch, g)
    return xs, ys, xv, yv, w, lam


def make_step(T):
    import torch

    xs, ys, xv, yv, w0, lam = _data(torch)
    grad = torch.autograd.grad

    def step():
        w = w0
        for k in range(T):
            g = grad(_loss(torch, xs[k % NB], w, ys[k % NB]), w, create_graph=True)
            w = tuple(wi - LR * (gi + li * wi) for wi, gi, li in zip(w, g, lam))
        return grad(_loss(torch, xv, w, yv), lam)

    return step


def _workload(T):
    import torch

    step = make_step(T)
    # A T = 200 hypergradient takes seconds: cap the timed iterations as the
    # C bench does (max(5, 2000 / T)); torch_twins.py reads these.
    step.max_iters = max(5, 2000 // T)
    step.max_warmup = 2
    return step, _floor(torch, unroll_gemms(T))


def register(workload):
    """Adds the twins to bench/torch_twins.py's table."""
    for T in (10, 50, 200):
        workload("unroll_T%d" % T)(lambda T=T: _workload(T))


# --------------------------------------------------------------- memory


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(T, how):
    """One hypergradient in this (fresh) process; returns peak bytes."""
    import torch

    torch.set_num_threads(1)
    step = make_step(T)
    if how == "rss":
        before = _rss_bytes()
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cur = peak = 0
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def main():
    ap = argparse.ArgumentParser(description="peak memory of unroll_T*: ours vs PyTorch")
    ap.add_argument("--memory", action="store_true", help="print the memory table")
    ap.add_argument("--measure", nargs=2, metavar=("T", "HOW"), help=argparse.SUPPRESS)
    ap.add_argument("--build-dir", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "build-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.measure:
        print(measure(int(args.measure[0]), args.measure[1]))
        return 0
    if not args.memory:
        ap.print_help()
        return 2
    rows = []
    for T in (10, 50, 200):
        exe = os.path.join(args.build_dir, "bench", "bench_unroll_T%d" % T)
        r = subprocess.run([exe, "--iters", "1", "--warmup", "0"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, check=True)
        ours = json.loads(r.stdout.strip().splitlines()[-1])["peak_arena_bytes"]
        torch_b = {}
        for how in ("live", "rss"):
            t = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", str(T), how],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               check=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                    OPENBLAS_NUM_THREADS="1"))
            torch_b[how] = int(t.stdout.strip().splitlines()[-1])
        row = {"workload": "unroll_T%d" % T, "ours_peak_arena_bytes": ours,
               "torch_live_peak_bytes": torch_b["live"], "torch_rss_growth_bytes": torch_b["rss"],
               "ours_peak_mb": round(ours / 1048576.0, 2),
               "torch_live_peak_mb": round(torch_b["live"] / 1048576.0, 2),
               "torch_rss_growth_mb": round(torch_b["rss"] / 1048576.0, 2),
               "ours_over_torch_live": round(ours / torch_b["live"], 3),
               "ours_over_torch_rss": round(ours / torch_b["rss"], 3)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        mb = 1 / 1048576.0
        print("%-11s %12s %14s %13s %9s %8s" % ("workload", "ours MB", "torch live MB",
                                                "torch RSS MB", "/live", "/RSS"))
        for r in rows:
            print("%-11s %12.1f %14.1f %13.1f %9.2f %8.2f" % (
                r["workload"], r["ours_peak_arena_bytes"] * mb, r["torch_live_peak_bytes"] * mb,
                r["torch_rss_growth_bytes"] * mb, r["ours_over_torch_live"],
                r["ours_over_torch_rss"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
