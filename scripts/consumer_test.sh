#!/usr/bin/env bash
# The library as a user gets it: install to a temporary prefix from a copy
# of the source, delete that copy and its build tree, then build
# tests/consumer/main.c against the prefix five ways (pkg-config shared,
# pkg-config --static, fully static, find_package(hypertape) shared and
# static; and consumer/cxx from a C++-only project) and run each: it loads the embedded MNIST with
# ds_mnist_load(NULL, ...), so the data must come from the prefix, and checks
# a gradient against finite differences. Then the prefix is moved and the
# shared build must still find its library's data. Used by .ci/run.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
cc=${CC:-cc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
unset HYPERTAPE_DATA

"$src/scripts/deps.sh" g++ # the C++-only consumer below

step() { echo "consumer_test: $*"; }
fail() {
  echo "consumer_test: FAIL: $*" >&2
  exit 1
}

# 1. Install from a copy, then remove the copy and its build tree: the
#    installed library must not depend on either (the data path baked in for
#    uninstalled builds points into the deleted copy).
step "installing to $prefix"
mkdir "$work/src"
tar -C "$src" --exclude=./.git --exclude='./build*' -cf - . | tar -C "$work/src" -xf -
cp -r "$src/tests/consumer" "$work/consumer"
cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DHYPERTAPE_TESTS=OFF -DHYPERTAPE_EXAMPLES=OFF -DHYPERTAPE_BENCH=OFF >/dev/null
cmake --build "$work/build" -j"$(nproc)" >/dev/null
cmake --install "$work/build" >/dev/null
rm -rf "$work/src" "$work/build"
pc=$(find "$prefix" -name hypertape.pc)
[ -n "$pc" ] || fail "no hypertape.pc installed"
libdir=$(cd "$(dirname "$pc")/.." && pwd)
export PKG_CONFIG_PATH=$libdir/pkgconfig
for f in include/hypertape/hypertape.h share/hypertape/mnist/train-images-idx3-ubyte.gz \
  share/hypertape/mnist/t10k-labels-idx1-ubyte.gz; do
  [ -f "$prefix/$f" ] || fail "$f is not installed"
done

# run NAME BINARY: runs it, wants "consumer: ok" and the data from $2's prefix.
run() {
  local name=$1 bin=$2 want=$3 out
  out=$("$bin" 2>&1) || fail "$name: exit $?: $out"
  grep -q '^consumer: ok$' <<<"$out" || fail "$name: $out"
  grep -q "embedded MNIST from $want" <<<"$out" || fail "$name: data not from $want: $out"
  step "$name: ok ($(grep -o 'worst relative error [^,]*' <<<"$out"))"
}
needed() { readelf -d "$1" | grep -c "NEEDED.*libhypertape" || true; }

# 2. pkg-config, shared.
cd "$work"
# shellcheck disable=SC2046
$cc -std=c11 -Wall -Wextra -Werror -o shared consumer/main.c $(pkg-config --cflags --libs hypertape) \
  -Wl,-rpath,"$libdir"
[ "$(needed shared)" = 1 ] || fail "the pkg-config shared build does not use libhypertape.so"
run "pkg-config shared" ./shared "$prefix"

# 3. pkg-config --static: libhypertape.a with what --static lists after it
#    (--as-needed: nothing may come from the .so).
# shellcheck disable=SC2046
$cc -std=c11 -Wall -Wextra -Werror -o static consumer/main.c $(pkg-config --cflags hypertape) \
  -Wl,--as-needed -Wl,-Bstatic -lhypertape -Wl,-Bdynamic $(pkg-config --static --libs hypertape)
[ "$(needed static)" = 0 ] || fail "the pkg-config --static build still needs libhypertape.so"
run "pkg-config --static" ./static "$prefix"
# shellcheck disable=SC2046
# (libgomp.a warns that its dlopen needs the shared glibc at run time: shown
# only if the link fails.)
$cc -static -std=c11 -o full_static consumer/main.c $(pkg-config --static --cflags --libs hypertape) \
  2>full_static.log || fail "fully static link: $(cat full_static.log)"
run "pkg-config --static, -static" ./full_static "$prefix"

# 4. find_package(hypertape) in a CMake project, shared and static.
for kind in OFF ON; do
  cmake -S consumer -B "cmake_$kind" -DCMAKE_PREFIX_PATH="$prefix" -DHT_STATIC=$kind >/dev/null
  cmake --build "cmake_$kind" >/dev/null
  n=$(needed "cmake_$kind/consumer")
  [ "$kind" = ON ] && [ "$n" != 0 ] && fail "find_package static build needs libhypertape.so"
  [ "$kind" = OFF ] && [ "$n" != 1 ] && fail "find_package shared build does not use the .so"
  run "find_package(hypertape) $([ $kind = ON ] && echo static || echo shared)" \
    "cmake_$kind/consumer" "$prefix"
done

# 4b. A C++-only CMake project (no C compiler enabled) linking the static
#     library: the headers' extern "C" and libblis.a's OpenMP from CXX.
cmake -S consumer/cxx -B cmake_cxx -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build cmake_cxx >/dev/null
out=$(cmake_cxx/consumer_cxx 2>&1) || fail "C++ consumer: $out"
grep -q '^consumer-cxx: ok$' <<<"$out" || fail "C++ consumer: $out"
step "find_package(hypertape) from C++, static: ok"

# 5. HYPERTAPE_DATA wins, and a wrong one is an error naming it.
out=$(HYPERTAPE_DATA=$work/nowhere ./static 2>&1) && fail "HYPERTAPE_DATA=nowhere was ignored: $out"
grep -q "no MNIST images file in $work/nowhere" <<<"$out" || fail "HYPERTAPE_DATA error: $out"
step "HYPERTAPE_DATA overrides: ok"

# 6. A moved prefix: the shared library finds the data next to itself.
mv "$prefix" "$prefix.moved"
out=$(LD_LIBRARY_PATH=${libdir/$prefix/$prefix.moved} ./shared 2>&1) || fail "moved prefix: $out"
grep -q "embedded MNIST from $prefix.moved/" <<<"$out" || fail "moved prefix: $out"
step "moved prefix, shared: ok"
step "all passed"
