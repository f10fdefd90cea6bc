#!/usr/bin/env bash
# Every example's command line: --help works, and each kind of bad argument
# is refused before anything runs, with a message naming it, the usage line
# on stderr, nothing on stdout, and exit status 2. Also: the flags the README
# promises exist, and a run whose loss stops being finite exits non-zero.
#   tests/example_args.sh DIR   (DIR holds the built examples)
set -u
dir=${1:?usage: example_args.sh DIR_OF_EXAMPLES}
fails=0 checks=0
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT

# bad PROG 'MESSAGE' ARGS...: exit 2, MESSAGE and "usage:" on stderr, stdout empty.
bad() {
  local prog=$1 msg=$2 rc
  shift 2
  checks=$((checks + 1))
  "$dir/$prog" "$@" >"$out" 2>"$err"
  rc=$?
  if [ "$rc" -ne 2 ] || ! grep -qF -- "$msg" "$err" || ! grep -q '^usage: ' "$err" || [ -s "$out" ]; then
    echo "FAIL: $prog $* -> exit $rc (want 2), stderr must say '$msg' and give the usage:"
    sed 's/^/    /' "$err" | head -5
    [ -s "$out" ] && echo "    (and it printed on stdout: $(head -c 200 "$out"))"
    fails=$((fails + 1))
  fi
}

# help PROG FLAGS...: --help exits 0, prints the usage on stdout and lists each flag.
help() {
  local prog=$1 rc f
  shift
  checks=$((checks + 1))
  "$dir/$prog" --help >"$out" 2>"$err"
  rc=$?
  if [ "$rc" -ne 0 ] || ! grep -q '^usage: ' "$out" || [ -s "$err" ]; then
    echo "FAIL: $prog --help -> exit $rc (want 0), usage on stdout, nothing on stderr"
    fails=$((fails + 1))
  fi
  for f in "$@"; do
    checks=$((checks + 1))
    if ! grep -qE -- "^  $f( |\$)" "$out"; then
      echo "FAIL: $prog --help does not list $f"
      fails=$((fails + 1))
    fi
  done
}

# The flag with a number each program takes (bad values go to it), and a
# valid option and value to put before a trailing bad one.
declare -A real=([quickstart]=--lr [mnist_mlp]=--lr [mnist_cnn]=--lr [hpo_mnist]=--outer-lr
  [hyper_cleaning]=--outer-lr [lr_hypergradient]=--lr)
for prog in quickstart mnist_mlp mnist_cnn hpo_mnist compare_methods hyper_cleaning \
  lr_hypergradient; do
  bad $prog "unknown option '--bogus'" --bogus
  bad $prog "unknown option '--bogus'" --threads 1 --bogus
  bad $prog "unknown option '-x'" -x
  bad $prog "unexpected argument '--'" --
  bad $prog "unexpected argument 'extra'" extra
  bad $prog "unexpected argument 'extra'" --threads 1 extra
  bad $prog "--threads needs a value" --threads
  bad $prog "--threads needs a value" --threads=
  bad $prog "--threads needs a value" --threads --help
  bad $prog "--threads: '12abc' is not an integer" --threads 12abc
  bad $prog "--threads: 'nan' is not an integer" --threads nan
  bad $prog "--threads: ' 2' is not an integer" --threads ' 2'
  bad $prog "--threads: -1 is out of range (expected 1 to 256)" --threads -1
  bad $prog "--threads: 0 is out of range" --threads=0
  bad $prog "--threads: 99999999999999999999 is out of range" --threads 99999999999999999999
  bad $prog "--help takes no value" --help=yes
  f=${real[$prog]:-}
  if [ -n "$f" ]; then
    bad $prog "$f: 'nan' is not a finite number" $f nan
    bad $prog "$f: 'inf' is not a finite number" $f inf
    bad $prog "$f: '-inf' is not a finite number" $f -inf
    bad $prog "$f: '1e999' is not a finite number" $f 1e999
    bad $prog "$f: -0.1 is out of range (expected > 0" $f -0.1
    bad $prog "$f: 0 is out of range (expected > 0" $f 0
    bad $prog "$f: '0.1x' is not a number" $f 0.1x
    bad $prog "$f: 'fast' is not a number" $f fast
  fi
done
for prog in mnist_mlp mnist_cnn; do
  bad $prog "--epochs: -1 is out of range (expected 0 to 10000)" --epochs -1
  bad $prog "--epochs: '2.5' is not an integer" --epochs 2.5
  bad $prog "--seed: '-3' is not a non-negative integer" --seed -3
  bad $prog "--limit: -5 is out of range" --limit -5
  bad $prog "--data needs a value" --data
  bad $prog "--data needs a value" --data --epochs 1
  bad $prog "--save needs a value" --epochs 0 --save
done
bad hpo_mnist "--method: 'newton' is not one of unroll," --method newton
bad teaching "unknown option '--bogus'" --bogus
bad teaching "unexpected argument 'extra'" extra
bad teaching "--help takes no value" --help=yes
bad lr_hypergradient "--steps: 0 is out of range" --steps 0
bad hpo_mnist "--outer: 0 is out of range (expected 1 to 1000000)" --outer 0
bad hpo_mnist "--inner: '20steps' is not an integer" --inner 20steps
bad hpo_mnist "unknown option '--bogus'" --outer 1 --inner 2 --bogus
bad quickstart "--steps: 0 is out of range" --steps 0
bad quickstart "--seed: 'x1' is not a non-negative integer" --seed x1

# The README: "All of them take --help. The MNIST programs take --data DIR
# ..., --epochs, --seed and --threads"; hpo_mnist counts --outer/--inner.
help quickstart --steps --lr --seed --threads
help mnist_mlp --data --epochs --seed --threads --lr --limit --load --save
help mnist_cnn --data --epochs --seed --threads --lr --limit --load --save
help hpo_mnist --method --outer --inner --outer-lr --data --seed --threads
help compare_methods --threads

# A run that diverges stops with a message and a non-zero status (quickstart
# at lr 10 grows by about 19x a step and reaches inf near step 120).
checks=$((checks + 1))
"$dir/quickstart" --lr 10 >"$out" 2>"$err"
rc=$?
if [ "$rc" -eq 0 ] || ! grep -q "quickstart: the training loss is inf at step [0-9]*: training diverged" "$err" ||
  grep -q '^fitted' "$out"; then
  echo "FAIL: quickstart --lr 10 -> exit $rc, want non-zero with 'training diverged' and no fit line"
  sed 's/^/    /' "$err" | head -3
  fails=$((fails + 1))
fi

# HYPERTAPE_THREADS is the default when --threads is not given; --threads
# overrides it (quickstart's last line reports the GEMM threads in use).
threads() {
  local want=$1 got
  shift
  checks=$((checks + 1))
  got=$("$@" 2>&1 | sed -n 's/^GEMM kernels: .*, threads \([0-9]*\)$/\1/p')
  if [ "$got" != "$want" ]; then
    echo "FAIL: $* ran with '${got:-no threads line}' GEMM threads, want $want"
    fails=$((fails + 1))
  fi
}
threads 1 env -u HYPERTAPE_THREADS "$dir/quickstart"
threads 2 env HYPERTAPE_THREADS=2 "$dir/quickstart"
threads 1 env HYPERTAPE_THREADS=2 "$dir/quickstart" --threads 1
threads 2 env -u HYPERTAPE_THREADS "$dir/quickstart" --threads 2

echo "example_args: $checks checks, $fails failed"
[ "$fails" -eq 0 ]
