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
- installs python3-torch, libopenblas0-pthread and libjemalloc2 if missing
  (apt-get, root only) and stops with an error (exit 3/4) when torch or
  functorch cannot be imported, a workload has no twin or a twin fails:
  never a table with silent n/a columns;
- checks that torch really runs OpenBLAS (the library mapped into the
  process, OpenBLAS's core name, update-alternatives for libblas.so.3);
- runs the twin with /usr/bin/python3 and, for its command alone, unsets
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, so OpenBLAS picks its own kernels;
  where its pick is a generic kernel set because it does not know the CPU
  (0.3.21 on an Emerald Rapids: "Prescott", SSE3), it times the benches'
  GEMMs on every kernel set the CPU runs and sets OPENBLAS_CORETYPE to the
  fastest, as an expert would (--openblas-core own: never);
- runs the twin with three allocators (glibc's default, glibc tuned with
  MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, jemalloc by LD_PRELOAD)
  and, where the twin has several ways to be written (MAML: per-task loop,
  functorch.vmap(grad), hand-batched bmm), each of them; every workload
  keeps the fastest, and says which (torch_config, torch_alloc,
  torch_variant);
- pins threads on both sides: HYPERTAPE_THREADS / --threads for ours;
  OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and
  torch.set_num_threads for the twin;
- at more than one thread, torch's OpenMP pool and OpenBLAS's pthreads fight
  over the cores (2 cores, both at 2 threads, default spin-waiting: grad_mlp
  5.7 ms instead of 0.83 ms). So the twin is run in two configurations and
  the faster one is kept per run: (a) torch.set_num_threads(N),
  OMP_NUM_THREADS=N, OMP_WAIT_POLICY=passive; (b) torch.set_num_threads(1),
  OMP_NUM_THREADS=1, OpenBLAS at N threads;
- --clock auto (default) times both sides by process CPU time at 1 thread
  (a run on a machine shared with other work then does not count the time
  it was descheduled) and by the wall clock at more threads;
- floor_ms (our GEMMs alone), torch_floor_ms (the same GEMMs through
  OpenBLAS via torch.mm) and best_floor_ms = the lower of the two: the
  physical limit on this machine, and ours_over_best_floor against it.

    /usr/bin/python3 bench/run.py --gemm [--json]   # GF/s per GEMM shape the
        # benches use: ours (bench/gemm_rates, with the path ad_blas chose)
        # and OpenBLAS's via torch.mm, at each --threads

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


OPENBLAS_CORE = ""  # --openblas-core
PACKAGES = ("python3-torch", "libopenblas0-pthread", "libjemalloc2")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def ensure_packages(allow_install):
    """The twin's packages: Debian's torch, the OpenBLAS it should run, and
    jemalloc for the allocator variant. Installs what is missing (apt-get,
    as root); returns {package: state}."""
    def installed(p):
        r = sh(["dpkg-query", "-W", "-f=${Status}", p], check=False)
        return r.returncode == 0 and "install ok installed" in r.stdout

    missing = [p for p in PACKAGES if not installed(p)]
    state = {p: "installed" for p in PACKAGES if p not in missing}
    if missing and allow_install and os.geteuid() == 0:
        log("# installing %s" % " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = sh(["apt-get", "install", "-y"] + missing, env=env, check=False)
        if r.returncode != 0:  # stale package lists on a fresh machine
            sh(["apt-get", "update"], env=env, check=False)
            sh(["apt-get", "install", "-y"] + missing, env=env, check=False)
    for p in missing:
        state[p] = "installed now" if installed(p) else "MISSING"
    return state


# The allocators the twin is tried with; each workload keeps the fastest.
# glibc-tuned: no mmap/munmap per large tensor and no trimming of the heap
# top (the settings PyTorch's CPU performance guides give); jemalloc by
# LD_PRELOAD.
ALLOCATORS = (
    ("default", {}),
    ("glibc-tuned", {"MALLOC_MMAP_THRESHOLD_": "33554432",
                     "MALLOC_TRIM_THRESHOLD_": "17179869184"}),
    ("jemalloc", {"LD_PRELOAD": JEMALLOC}),
)


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


# OpenBLAS names its kernel set after the CPU models it knows. On a CPU
# newer than its release it falls back to a generic one: Debian's 0.3.21 calls
# Intel's family 6 model 207 (Emerald Rapids, AVX-512) "Prescott" and runs
# SSE3 kernels, 4-5x below the machine (128x200x784: 26 GF/s against 133 with
# OPENBLAS_CORETYPE=SkylakeX). A PyTorch expert who saw that would set
# OPENBLAS_CORETYPE, so the bench does it for them: kernel sets by the vector
# features they need, and the flag that says the CPU has them.
OPENBLAS_AVX512_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
OPENBLAS_AVX2_CORES = ("Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids")
OPENBLAS_CANDIDATES = (("avx512f", "SkylakeX"), ("avx512_bf16", "Cooperlake"),
                       ("avx2", "Haswell"))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_fallback(own):
    """Whether OpenBLAS's own core `own` uses fewer vector features than
    this CPU has (it did not know the CPU)."""
    flags = cpu_flags()
    if "avx512f" in flags and own not in OPENBLAS_AVX512_CORES:
        return True
    return "avx2" in flags and own not in OPENBLAS_AVX2_CORES


def pick_openblas_core(own, spec):
    """--openblas-core best on a CPU OpenBLAS fell back on: times the
    benches' GEMM shapes (torch_twins.py --gemm, 1 thread, CPU clock) on
    OpenBLAS's own pick and on every kernel set this CPU can run, and
    returns the fastest (its name, and each candidate's total ms)."""
    flags = cpu_flags()
    cands = [""] + [c for flag, c in OPENBLAS_CANDIDATES if flag in flags]
    totals = {}
    for core in cands:
        env = twin_configs(1)[0][2]
        env.pop("OPENBLAS_CORETYPE", None)
        if core:
            env["OPENBLAS_CORETYPE"] = core
        best = None
        for _ in range(2):
            t = sh([PY, TWINS, "--gemm"] + spec + ["--threads", "1", "--clock", "cpu"], env=env)
            ms = 0.0
            for line in t.stdout.splitlines():
                j = json.loads(line)
                ms += 2e-6 * j["m"] * j["n"] * j["k"] / j["gflops"]
            best = ms if best is None else min(best, ms)
        totals[core or own] = round(best, 3)
    win = min(totals, key=totals.get)
    return ("" if win == own else win), totals


def build(build_dir, targets):
    """Configures a Release build with only the benches on and builds each
    target on its own, so one that does not compile costs only its row.
    Returns the targets that built."""
    log("# building %s in %s" % (", ".join(targets), build_dir))
    # The library's own build dependencies (BLIS, Check, CMake): a fresh
    # machine has none of them, and the README promises one command.
    sh([os.path.join(ROOT, "scripts", "deps.sh")])
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
        if OPENBLAS_CORE:  # --openblas-core or a fallback OpenBLAS (see pick_openblas_core)
            e["OPENBLAS_CORETYPE"] = OPENBLAS_CORE
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


def clock(args, threads):
    if args.clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return args.clock


def bench_shapes():
    """Every GEMM shape (m, n, k, ta, tb) the benches' floors use, from the
    twins' lists (which mirror the C floors), first-use order."""
    sys.path.insert(0, HERE)
    import torch_twins  # noqa: F401  (registers the twins)
    import twins_implicit
    import twins_unroll

    lists = [torch_twins.MLP_HVP_GEMMS, twins_implicit.IMPLICIT_GEMMS,
             twins_unroll.unroll_gemms(2), torch_twins.CNN_GEMMS, twins_implicit._maml_gemms(1)]
    out = []
    for lst in lists:
        for s in lst:
            if tuple(s) not in out:
                out.append(tuple(s))
    return out


def gemm_table(args, bindir, threads_list, blas):
    """--gemm: per shape and thread count our GF/s (bench/gemm_rates, with
    the path ad_blas chose) and OpenBLAS's through torch.mm (Python's call
    overhead, about 2-4 us, makes the tiny shapes read low for OpenBLAS);
    each side run --repeat times alternately, the fastest kept."""
    shapes = bench_shapes()
    spec = ["%d,%d,%d,%d,%d" % s for s in shapes]
    rows = []
    for threads in threads_list:
        ours, theirs = {}, {}
        for _ in range(max(1, args.repeat)):
            r = sh([os.path.join(bindir, "gemm_rates"), "--threads", str(threads),
                    "--clock", clock(args, threads)] + spec, env=ours_env(threads))
            for line in r.stdout.splitlines():
                j = json.loads(line)
                key = (j["m"], j["n"], j["k"], j["ta"], j["tb"])
                if key not in ours or j["gflops"] > ours[key]["gflops"]:
                    ours[key] = j
            env = twin_configs(1)[0][2]
            env.update(OPENBLAS_NUM_THREADS=str(threads))
            t = sh([PY, TWINS, "--gemm"] + spec + ["--threads", str(threads),
                                                   "--clock", clock(args, threads)], env=env)
            for line in t.stdout.splitlines():
                j = json.loads(line)
                key = (j["m"], j["n"], j["k"], j["ta"], j["tb"])
                if key not in theirs or j["gflops"] > theirs[key]["gflops"]:
                    theirs[key] = j
        for key in shapes:
            o, t = ours[key], theirs[key]
            row = {"m": key[0], "n": key[1], "k": key[2], "ta": key[3], "tb": key[4],
                   "threads": threads, "ours_gflops": o["gflops"], "ours_path": o["path"],
                   "openblas_gflops": t["gflops"],
                   "ours_over_openblas": round(o["gflops"] / t["gflops"], 3),
                   "kernel": o["kernel"], "openblas": blas.get("summary"),
                   "openblas_coretype": blas.get("openblas_coretype"),
                   "clock": clock(args, threads)}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print("GEMM GF/s  cpu: %s  ours: BLIS %s  theirs: %s via torch.mm" % (
            cpu_model(), rows[0]["kernel"] if rows else "?", blas.get("summary")))
        print("%-16s %3s %9s %-16s %9s %7s" % ("m x n x k  tAtB", "thr", "ours", "path",
                                                "OpenBLAS", "ratio"))
        for r in rows:
            print("%-16s %3d %9.1f %-16s %9.1f %7.2f" % (
                "%dx%dx%d %d%d" % (r["m"], r["n"], r["k"], r["ta"], r["tb"]), r["threads"],
                r["ours_gflops"], r["ours_path"], r["openblas_gflops"], r["ours_over_openblas"]))
    return 0


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
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="what both sides time by: cpu = process CPU time (not counting "
                    "time descheduled on a shared machine); auto = cpu at 1 thread, wall above")
    ap.add_argument("--openblas-core", default="best",
                    help="the twin's OpenBLAS kernel set (OPENBLAS_CORETYPE): 'best' (default) "
                         "keeps OpenBLAS's own pick unless it fell back to a generic set on a "
                         "CPU it does not know, then the fastest set the CPU runs; 'own' always "
                         "its own pick; or a name, e.g. Haswell: with HYPERTAPE_BLIS_ARCH=haswell "
                         "both sides then run AVX2 kernels on an AVX-512 CPU")
    ap.add_argument("--gemm", action="store_true",
                    help="GF/s per GEMM shape the benches use, ours and OpenBLAS's (via torch)")
    args = ap.parse_args()
    global OPENBLAS_CORE
    OPENBLAS_CORE = "" if args.openblas_core in ("best", "own") else args.openblas_core
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
    if not args.no_build:
        build(args.build_dir, ["bench_" + n for n in names] + ["gemm_rates"])
    bindir = os.path.join(args.build_dir, "bench")
    missing = [n for n in names if not os.access(os.path.join(bindir, "bench_" + n), os.X_OK)]
    if missing:
        log("# no binary for %s in %s; skipped" % (", ".join(missing), bindir))
        names = [n for n in names if n not in missing]

    pkgs = ensure_packages(not args.no_install)
    r = sh([PY, "-c", "import torch, functorch"], check=False)
    if r.returncode != 0:
        log("FATAL: %s cannot import torch/functorch (packages: %s):\n%s"
            % (PY, pkgs, r.stderr[-1000:]))
        return 3
    if not os.path.exists(JEMALLOC):
        log("FATAL: %s missing (libjemalloc2: %s)" % (JEMALLOC, pkgs.get("libjemalloc2")))
        return 3
    twins = sh([PY, TWINS, "--list"]).stdout.split()
    no_twin = [n for n in names if n not in twins]
    if no_twin:
        log("FATAL: no twin for %s in %s" % (", ".join(no_twin), TWINS))
        return 3
    r = sh([PY, TWINS, "--blas-info"], env=twin_configs(1)[0][2], check=False)
    if r.returncode != 0:
        log("FATAL: torch --blas-info failed:\n" + r.stderr[-1000:])
        return 3
    blas = last_json(r.stdout)
    own = blas.get("openblas_core", "")
    if not own:
        # Debian's torch links the generic libblas.so.3; without OpenBLAS
        # behind it that is the reference BLAS, 5-6x below the machine, and
        # every ratio would flatter us (seen with --no-install on a machine
        # that had python3-torch but not libopenblas0-pthread).
        log("FATAL: torch's BLAS is not OpenBLAS (libblas.so.3 -> %s; libopenblas0-pthread: %s); "
            "run without --no-install or apt-get install libopenblas0-pthread"
            % (blas_alternative(), pkgs.get("libopenblas0-pthread")))
        return 3
    blas["openblas_own_core"] = own
    if args.openblas_core == "best" and own and openblas_fallback(own):
        core, totals = pick_openblas_core(own, ["%d,%d,%d,%d,%d" % s for s in bench_shapes()])
        log("# OpenBLAS picked %s, a generic kernel set, on this CPU (%s); the benches' GEMMs "
            "take %s ms per kernel set; the twin runs %s" % (
                own, cpu_model(), ", ".join("%s %.3f" % kv for kv in totals.items()),
                "OPENBLAS_CORETYPE=" + core if core else "OpenBLAS's own pick"))
        OPENBLAS_CORE = core
        blas["openblas_core_probe_ms"] = totals
        if core:
            r = sh([PY, TWINS, "--blas-info"], env=twin_configs(1)[0][2])
            blas = dict(last_json(r.stdout), openblas_own_core=own,
                        openblas_core_probe_ms=totals)
    blas["openblas_coretype"] = OPENBLAS_CORE
    if args.gemm:
        return gemm_table(args, bindir, threads_list, blas)
    variants = {n: sh([PY, TWINS, "--variants", n]).stdout.split() for n in names}

    rows, kernel_line, failed = [], None, []
    for threads in threads_list:
        for name in names:
            ours_runs, torch_runs = [], []
            # Ours and the twin alternate run by run, so a burst of load from
            # elsewhere on the machine hits both; the lowest median of the
            # repeats is the one least disturbed, taken alike on both sides.
            for _ in range(max(1, args.repeat)):
                r = sh([os.path.join(bindir, "bench_" + name), "--threads", str(threads),
                        "--iters", str(args.iters), "--warmup", str(args.warmup),
                        "--clock", clock(args, threads)],
                       env=ours_env(threads), check=False)
                if r.returncode != 0:
                    log("# bench_%s failed (%d); its row is left out:\n%s"
                        % (name, r.returncode, r.stderr[-2000:]))
                    break
                ours_runs.append(last_json(r.stdout))
                for label, intraop, env0 in twin_configs(threads):
                    for alloc, extra in ALLOCATORS:
                        for variant in variants[name]:
                            env = dict(env0, **extra)
                            t = sh([PY, TWINS, "--workload", name, "--threads", str(threads),
                                    "--intraop", str(intraop), "--iters", str(args.iters),
                                    "--warmup", str(args.warmup), "--variant", variant,
                                    "--clock", clock(args, threads)], env=env, check=False)
                            if t.returncode != 0:
                                log("FATAL: twin %s (%s, %s, %s) failed:\n%s"
                                    % (name, label, alloc, variant, t.stderr[-2000:]))
                                return 4
                            torch_runs.append(dict(last_json(t.stdout), config=label,
                                                   alloc=alloc))
            if not ours_runs:
                failed.append(name)
                continue
            ours = min(ours_runs, key=lambda j: j["ours_ms"])
            floor_ms = min(j["floor_ms"] for j in ours_runs)
            if kernel_line is None:
                kernel_line = "%s (%s)" % (ours.get("kernel"), ours.get("kernel_reason"))
            row = {"workload": name, "threads": threads, "ours_ms": ours["ours_ms"],
                   "torch_ms": None, "ratio": None, "floor_ms": floor_ms,
                   "torch_floor_ms": None, "best_floor_ms": None,
                   "ours_over_floor": round(ours["ours_ms"] / floor_ms, 3),
                   "kernel": ours.get("kernel"), "torch_blas": blas.get("summary"),
                   "openblas_own_core": blas.get("openblas_own_core"),
                   "openblas_coretype": blas.get("openblas_coretype"),
                   "iters": args.iters, "repeat": len(ours_runs)}
            if torch_runs:
                best = min(torch_runs, key=lambda j: j["torch_ms"])
                row["torch_ms"] = best["torch_ms"]
                row["torch_floor_ms"] = min(j["torch_floor_ms"] for j in torch_runs)
                row["ratio"] = round(row["ours_ms"] / row["torch_ms"], 3)
                row["torch_config"] = best["config"]
                row["torch_alloc"] = best["alloc"]
                row["torch_variant"] = best.get("variant", "default")
                # Every variant's best, so the table can show what lost.
                row["torch_by_variant"] = {
                    v: min(j["torch_ms"] for j in torch_runs if j.get("variant") == v)
                    for v in variants[name]}
                row["best_floor_ms"] = min(floor_ms, row["torch_floor_ms"])
                row["ours_over_best_floor"] = round(row["ours_ms"] / row["best_floor_ms"], 3)
            row["clock"] = clock(args, threads)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)

    if args.json:
        return 1 if failed else 0
    print("hypertape bench  cpu: %s  (%d cores online)" % (cpu_model(), os.cpu_count() or 0))
    print("ours : BLIS %s" % (kernel_line or "?"))
    print("torch %s: %s; packages %s; libblas.so.3 -> %s" % (
        blas.get("torch", "?"), blas.get("summary", "?"),
        ", ".join("%s %s" % kv for kv in pkgs.items()), blas_alternative()))
    print("       torch libs: %s" % (", ".join(blas.get("libs", [])) or "-"))
    if blas.get("openblas_coretype"):
        print("       OPENBLAS_CORETYPE=%s: OpenBLAS's own pick %s is a generic kernel set on "
              "this CPU (GEMM probe, ms: %s)" % (
                  blas["openblas_coretype"], blas.get("openblas_own_core"),
                  blas.get("openblas_core_probe_ms", "-")))
    print("       at >1 thread the faster of: intraop N + OMP_WAIT_POLICY=passive, "
          "intraop 1 + OpenBLAS N")
    print("per program run: median of %d iterations after %d warmup; lowest of %d runs; "
          "ratio = ours/torch" % (args.iters, args.warmup, max(1, args.repeat)))
    print("clock: %s" % ("process CPU time at 1 thread, wall at more" if args.clock == "auto"
                         else args.clock))
    print("twin: fastest of allocators %s and, for MAML, variants loop / vmap / batched"
          % "/".join(a for a, _ in ALLOCATORS))
    hdr = "%-17s %3s %9s %9s %9s %9s %8s %9s %7s  %s" % (
        "workload", "thr", "ours_ms", "floor_ms", "t_floor", "best_fl", "ours/bf", "torch_ms",
        "ratio", "twin (config, allocator, variant)")
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt="%10.3f"):
        return fmt % v if v is not None else "%10s" % "n/a"

    for r in rows:
        print("%-17s %3d %s %s %s %s %8.3f %s %7.3f  %s, %s, %s" % (
            r["workload"], r["threads"], f(r["ours_ms"], "%9.3f"), f(r["floor_ms"], "%9.3f"),
            f(r["torch_floor_ms"], "%9.3f"), f(r["best_floor_ms"], "%9.3f"),
            r["ours_over_best_floor"], f(r["torch_ms"], "%9.3f"), r["ratio"],
            r.get("torch_config", ""), r.get("torch_alloc", ""), r.get("torch_variant", "")))
    if failed:
        print("failed: %s (see stderr)" % ", ".join(sorted(set(failed))))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
