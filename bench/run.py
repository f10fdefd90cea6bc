#!/usr/bin/python3
"""Side-by-side benchmark driver: hypertape (bench/bench_*.c) against its
PyTorch twins (bench/torch_twins.py), at 1 and 2 threads.

    /usr/bin/python3 bench/run.py            # table
    /usr/bin/python3 bench/run.py --json     # one JSON object per workload and thread count
    /usr/bin/python3 bench/run.py --only grad_mlp --threads 1 --iters 500

Per row: ours_ms and floor_ms (the same GEMMs alone through ad_gemm_f32, in
the same program run), torch_ms and torch_floor_ms (those GEMMs through
torch.mm), ratio = ours_ms / torch_ms. Each program run reports medians of
--iters timed iterations after --warmup untimed ones; each program is run
--repeat times, alternating ours and torch, and the lowest median is kept
for every column alike (other work on a 2-core machine shows up as whole
runs that are slow, not as single slow iterations).

What it does to keep the comparison fair:
- builds the benches in Release in their own build directory (--build-dir);
- installs libopenblas0-pthread if missing (apt-get, root only) and checks
  that torch really runs OpenBLAS (the library mapped into the process,
  OpenBLAS's core name, update-alternatives for libblas.so.3);
- runs the twin with /usr/bin/python3 and, for its command alone, unsets
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, so OpenBLAS picks its own kernels;
- pins threads on both sides: HYPERTAPE_THREADS / --threads for ours;
  OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and
  torch.set_num_threads for the twin;
- at more than one thread, torch's OpenMP pool and OpenBLAS's pthreads fight
  over the cores (2 cores, both at 2 threads, default spin-waiting: grad_mlp
  5.7 ms instead of 0.83 ms). So the twin is run in two configurations and
  the faster one is kept per run: (a) torch.set_num_threads(N),
  OMP_NUM_THREADS=N, OMP_WAIT_POLICY=passive; (b) torch.set_num_threads(1),
  OMP_NUM_THREADS=1, OpenBLAS at N threads. (b) mirrors ours: elementwise
  work on one thread (at these sizes torch would not split it anyway), N
  threads inside each GEMM. Ours keeps OpenMP's default (active) wait
  policy, which is faster for BLIS's own threads. The JSON field
  torch_config says which configuration won.

Adding a workload: bench/bench_NAME.c (prints the JSON line, see
bench_util.h) and a function in torch_twins.py registered as NAME. A
workload without a twin still runs; its torch columns read n/a.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = "/usr/bin/python3"
TWINS = os.path.join(HERE, "torch_twins.py")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, env=None, check=True):
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


def ensure_openblas(allow_install):
    """libopenblas0-pthread is what Debian's torch should run; install it if
    it is missing (only as root, only that package)."""
    r = sh(["dpkg-query", "-W", "-f=${Status}", "libopenblas0-pthread"], check=False)
    if r.returncode == 0 and "install ok installed" in r.stdout:
        return "installed"
    if not allow_install:
        return "missing (--no-install)"
    if os.geteuid() != 0:
        return "missing (not root: apt-get install libopenblas0-pthread)"
    log("# installing libopenblas0-pthread")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = sh(["apt-get", "install", "-y", "libopenblas0-pthread"], env=env, check=False)
    if r.returncode != 0:  # stale package lists on a fresh machine
        sh(["apt-get", "update"], env=env, check=False)
        r = sh(["apt-get", "install", "-y", "libopenblas0-pthread"], env=env, check=False)
    return "installed now" if r.returncode == 0 else "install failed: " + r.stderr.strip()[-200:]


def blas_alternative():
    """Where libblas.so.3 points (what a generic-BLAS torch loads)."""
    exe = shutil.which("update-alternatives")
    if not exe:
        return "?"
    r = sh([exe, "--display", "libblas.so.3-x86_64-linux-gnu"], check=False)
    for line in r.stdout.splitlines():
        if "currently points to" in line:
            return line.split("currently points to")[-1].strip()
    return "?"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def build(build_dir, targets):
    """Configures a Release build with only the benches on and builds each
    target on its own, so one that does not compile costs only its row.
    Returns the targets that built."""
    log("# building %s in %s" % (", ".join(targets), build_dir))
    sh(["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
        "-DHYPERTAPE_BENCH=ON", "-DHYPERTAPE_TESTS=OFF", "-DHYPERTAPE_EXAMPLES=OFF"])
    ok = []
    for t in targets:
        r = sh(["cmake", "--build", build_dir, "-j2", "--target", t], check=False)
        if r.returncode == 0:
            ok.append(t)
        else:
            log("# %s does not build; skipped:\n%s" % (t, (r.stdout + r.stderr)[-1500:]))
    return ok


def twin_configs(threads):
    """(label, intraop threads, environment) for each way the twin is run."""
    def env(omp, wait):
        e = dict(os.environ)
        e.pop("OPENBLAS_CORETYPE", None)
        e.pop("OPENBLAS_L2_SIZE", None)
        e.pop("OMP_WAIT_POLICY", None)
        for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            e[k] = str(threads)
        e["OMP_NUM_THREADS"] = str(omp)
        if wait:
            e["OMP_WAIT_POLICY"] = wait
        return e

    if threads == 1:
        return [("intraop1", 1, env(1, None))]
    return [("intraop%d+passive" % threads, threads, env(threads, "passive")),
            ("intraop1+blas%d" % threads, 1, env(1, None))]


def ours_env(threads):
    env = dict(os.environ)
    env["HYPERTAPE_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    env["BLIS_NUM_THREADS"] = str(threads)
    return env


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output:\n" + text)


def main():
    ap = argparse.ArgumentParser(description="hypertape vs PyTorch benchmarks")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a table")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each program; the lowest median is kept (default 3)")
    ap.add_argument("--only", help="comma-separated workloads")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build-bench"))
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install")
    args = ap.parse_args()
    threads_list = [int(t) for t in args.threads.split(",") if t.strip()]

    names = sorted(os.path.basename(p)[len("bench_"):-2]
                   for p in glob.glob(os.path.join(HERE, "bench_*.c")))
    if args.only:
        want = [w.strip() for w in args.only.split(",")]
        unknown = [w for w in want if w not in names]
        if unknown:
            log("unknown workload(s): %s; known: %s" % (", ".join(unknown), ", ".join(names)))
            return 2
        names = want
    twins = sh([PY, TWINS, "--list"], check=False).stdout.split()

    if not args.no_build:
        build(args.build_dir, ["bench_" + n for n in names])
    bindir = os.path.join(args.build_dir, "bench")
    missing = [n for n in names if not os.access(os.path.join(bindir, "bench_" + n), os.X_OK)]
    if missing:
        log("# no binary for %s in %s; skipped" % (", ".join(missing), bindir))
        names = [n for n in names if n not in missing]

    openblas = ensure_openblas(not args.no_install)
    torch_ok = sh([PY, "-c", "import torch"], check=False).returncode == 0
    blas = {}
    if torch_ok:
        r = sh([PY, TWINS, "--blas-info"], env=twin_configs(1)[0][2], check=False)
        blas = last_json(r.stdout) if r.returncode == 0 else {"summary": "? " + r.stderr[-200:]}

    rows, kernel_line, failed = [], None, []
    for threads in threads_list:
        for name in names:
            ours_runs, torch_runs = [], []
            # Ours and the twin alternate run by run, so a burst of load from
            # elsewhere on the machine hits both; the lowest median of the
            # repeats is the one least disturbed, taken alike on both sides.
            for _ in range(max(1, args.repeat)):
                r = sh([os.path.join(bindir, "bench_" + name), "--threads", str(threads),
                        "--iters", str(args.iters), "--warmup", str(args.warmup)],
                       env=ours_env(threads), check=False)
                if r.returncode != 0:
                    log("# bench_%s failed (%d); its row is left out:\n%s"
                        % (name, r.returncode, r.stderr[-2000:]))
                    break
                ours_runs.append(last_json(r.stdout))
                for label, intraop, env in (twin_configs(threads) if torch_ok and name in twins
                                            else []):
                    t = sh([PY, TWINS, "--workload", name, "--threads", str(threads),
                            "--intraop", str(intraop), "--iters", str(args.iters),
                            "--warmup", str(args.warmup)], env=env, check=False)
                    if t.returncode == 0:
                        torch_runs.append(dict(last_json(t.stdout), config=label))
                    else:
                        log("twin %s (%s) failed:\n%s" % (name, label, t.stderr[-2000:]))
            if not ours_runs:
                failed.append(name)
                continue
            ours = min(ours_runs, key=lambda j: j["ours_ms"])
            floor_ms = min(j["floor_ms"] for j in ours_runs)
            if kernel_line is None:
                kernel_line = "%s (%s)" % (ours.get("kernel"), ours.get("kernel_reason"))
            row = {"workload": name, "threads": threads, "ours_ms": ours["ours_ms"],
                   "torch_ms": None, "ratio": None, "floor_ms": floor_ms,
                   "torch_floor_ms": None, "ours_over_floor": round(ours["ours_ms"] / floor_ms, 3),
                   "kernel": ours.get("kernel"), "torch_blas": blas.get("summary"),
                   "iters": args.iters, "repeat": len(ours_runs)}
            if torch_runs:
                best = min(torch_runs, key=lambda j: j["torch_ms"])
                row["torch_ms"] = best["torch_ms"]
                row["torch_floor_ms"] = min(j["torch_floor_ms"] for j in torch_runs)
                row["ratio"] = round(row["ours_ms"] / row["torch_ms"], 3)
                row["torch_config"] = best["config"]
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)

    if args.json:
        return 1 if failed else 0
    print("hypertape bench  cpu: %s  (%d cores online)" % (cpu_model(), os.cpu_count() or 0))
    print("ours : BLIS %s" % (kernel_line or "?"))
    print("torch: %s; libopenblas0-pthread %s; libblas.so.3 -> %s" % (
        blas.get("summary", "torch not importable with " + PY), openblas, blas_alternative()))
    print("       torch libs: %s" % (", ".join(blas.get("libs", [])) or "-"))
    print("       at >1 thread the faster of: intraop N + OMP_WAIT_POLICY=passive, "
          "intraop 1 + OpenBLAS N")
    print("per program run: median of %d iterations after %d warmup; lowest of %d runs; "
          "ratio = ours/torch" % (args.iters, args.warmup, max(1, args.repeat)))
    hdr = "%-12s %3s %10s %10s %8s %10s %10s %7s  %s" % (
        "workload", "thr", "ours_ms", "floor_ms", "ours/fl", "torch_ms", "t_floor", "ratio",
        "torch config")
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt="%10.3f"):
        return fmt % v if v is not None else "%10s" % "n/a"

    for r in rows:
        print("%-12s %3d %s %s %8.3f %s %s %s  %s" % (
            r["workload"], r["threads"], f(r["ours_ms"]), f(r["floor_ms"]), r["ours_over_floor"],
            f(r["torch_ms"]), f(r["torch_floor_ms"]),
            ("%7.3f" % r["ratio"]) if r["ratio"] is not None else "    n/a",
            r.get("torch_config", "")))
    if failed:
        print("failed: %s (see stderr)" % ", ".join(sorted(set(failed))))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
