#!/usr/bin/env bash
# Draws an example's JSON-lines log (--log FILE) as a PNG with gnuplot:
# learning curves and hyperparameter trajectories.
#
#   scripts/plot.sh LOG [PNG]        # PNG defaults to LOG with .jsonl replaced by .png
#   scripts/plot.sh --no-deps LOG    # do not try to install gnuplot
#
# The kind of picture follows from the log's fields:
#   hyper_cleaning    validation loss and accuracy; mean weight of the clean and
#                     of the corrupted examples, and F1 of the flags, per outer step
#   lr_hypergradient  smoothed training loss, learned schedule vs fixed lr; the
#                     learning rate and momentum it finds, per step
#   teaching          |error| of every bl_ method against the closed form (log scale)
#   maml_sinusoid     meta-training loss of each method against the meta-step
#   engine logs       (hpo_mnist --log, any bl_engine json_path) each level's loss
#                     and the hypergradient norm per engine step
#   darts_search      search losses, and the architecture weights of each edge
#   anything else     every numeric field against the first one, one panel each
# Installs gnuplot-nox (and graphviz, which teaching uses to draw its tape)
# through scripts/deps.sh when they are missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deps=1
if [ "${1:-}" = "--no-deps" ]; then deps=0; shift; fi
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1:-}" = "--help" ]; then
  echo "usage: scripts/plot.sh [--no-deps] LOG [PNG]" >&2
  exit 2
fi
log="$1"
png="${2:-${log%.jsonl}.png}"
[ -s "$log" ] || { echo "plot.sh: $log is missing or empty" >&2; exit 1; }
[ "$deps" = 1 ] && "$here/deps.sh" gnuplot-nox graphviz
command -v gnuplot >/dev/null || { echo "plot.sh: gnuplot is not installed" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# columns KEY... < LOG: one whitespace-separated row per JSON line holding
# those keys' values (strings unquoted, blanks turned to '_'; a missing key
# is NaN). A flat-object reader, enough for the logs the examples write.
columns() {
  awk -v keys="$*" '
    BEGIN { nk = split(keys, k, " ") }
    {
      row = ""
      for (i = 1; i <= nk; i++) {
        pat = "\"" k[i] "\":"
        p = index($0, pat)
        v = "NaN"
        if (p > 0) {
          s = substr($0, p + length(pat))
          sub(/^ */, "", s)
          if (substr(s, 1, 1) == "\"") {
            s = substr(s, 2); v = substr(s, 1, index(s, "\"") - 1); gsub(/ /, "_", v)
          } else {
            v = s; sub(/[,}].*$/, "", v); gsub(/ /, "", v)
          }
        }
        row = row (i > 1 ? " " : "") v
      }
      print row
    }'
}

first="$(head -n 1 "$log")"
has() { case "$first" in *"\"$1\":"*) return 0 ;; *) return 1 ;; esac; }
term='set terminal pngcairo size 1100,420 font "Sans,10"'

if has weight_noisy; then
  columns step val_loss val_accuracy weight_clean weight_noisy f1 <"$log" >"$tmp/d"
  gnuplot <<EOF
$term
set output "$png"
set multiplot layout 1,2 title "hyper-cleaning: 50% of the training labels flipped"
set xlabel "outer step"; set grid
set ylabel "validation loss"; set y2label "validation accuracy"; set ytics nomirror; set y2tics
set key center right
plot "$tmp/d" u 1:2 w l lw 2 t "val loss", "" u 1:3 axes x1y2 w l lw 2 t "val accuracy"
unset y2label; unset y2tics; set ytics mirror
set ylabel "mean weight sigmoid(lam_i)  /  F1"; set yrange [0:1]
plot "$tmp/d" u 1:4 w l lw 2 t "clean examples", "" u 1:5 w l lw 2 t "corrupted examples", \
     "" u 1:6 w l lw 2 dt 2 t "F1 of flags (weight < 0.5)"
unset multiplot
EOF
elif has loss_fixed; then
  columns step loss_ema loss_fixed_ema lr momentum <"$log" >"$tmp/d"
  gnuplot <<EOF
$term
set output "$png"
set multiplot layout 1,2 title "hypergradient descent on lr and momentum (MLP on MNIST)"
set xlabel "step"; set grid; set logscale y
set ylabel "training loss (batch, smoothed)"
plot "$tmp/d" u 1:2 w l lw 2 t "learned lr and momentum", "" u 1:3 w l lw 2 t "fixed at the start values"
unset logscale y
set ylabel "learning rate"; set y2label "momentum"; set ytics nomirror; set y2tics
set key top right
plot "$tmp/d" u 1:4 w l lw 2 t "lr", "" u 1:5 axes x1y2 w l lw 2 t "momentum"
unset multiplot
EOF
elif has kind; then
  grep '"kind": "method"' "$log" | columns method abs_error >"$tmp/d"
  [ -s "$tmp/d" ] || { echo "plot.sh: no method rows in $log" >&2; exit 1; }
  gnuplot <<EOF
$term
set output "$png"
set title "one hypergradient, every bl_ method, against the closed form (f64)" noenhanced
set logscale y; set yrange [1e-17:*]; set grid y
set ylabel "|hypergradient - closed form|  (0 drawn at 1e-17)"
set style fill solid 0.7; set boxwidth 0.7
set xtics rotate by -40 noenhanced; set bmargin 8; set rmargin 6
plot "$tmp/d" u 0:(\$2 > 1e-17 ? \$2 : 1e-17):xtic(1) w boxes notitle
EOF
elif has hg_norm; then
  # The engine's JSON lines (bl_engine.h): each level's loss, and the
  # hypergradient norm, per engine step.
  levels="$(printf '%s\n' "$first" | sed -n 's/.*"loss": *{\([^}]*\)}.*/\1/p' | tr ',' '\n' |
    sed -n 's/^ *"\([A-Za-z0-9_]*\)":.*/\1/p' | tr '\n' ' ')"
  set -- $levels
  [ $# -ge 1 ] || { echo "plot.sh: no level losses in $log" >&2; exit 1; }
  columns step hg_norm "$@" <"$log" >"$tmp/d"
  {
    echo "$term"
    echo "set output \"$png\""
    echo "set multiplot layout 1,2 title \"engine run: $(basename "$log")\" noenhanced"
    echo "set grid; set xlabel \"engine step\"; set ylabel \"loss\""
    line="plot"
    sep=""
    c=3
    for l in "$@"; do
      line="$line$sep \"$tmp/d\" u 1:$c w lp lw 2 t \"$l\" noenhanced"
      sep=","
      c=$((c + 1))
    done
    echo "$line"
    echo "set ylabel \"|hypergradient|\"; plot \"$tmp/d\" u 1:2 w lp lw 2 t \"hypergradient norm\""
    echo "unset multiplot"
  } | gnuplot
elif has maml_train_loss; then
  # One series per method: each line holds one method's loss.
  for m in maml fomaml imaml metasgd baseline; do
    grep "\"${m}_train_loss\"" "$log" | columns step ${m}_train_loss >"$tmp/$m"
  done
  gnuplot <<EOF
$term
set output "$png"
set title "sinusoid regression (Finn et al. 2017): meta-training loss, 10 shots, one inner step"
set xlabel "meta-step"; set ylabel "query MSE after adaptation (meta-batch)"; set grid
set logscale y; set key top right
plot "$tmp/maml" u 1:2 w lp lw 2 t "MAML", "$tmp/fomaml" u 1:2 w lp lw 2 t "FOMAML", \\
     "$tmp/imaml" u 1:2 w lp lw 2 t "iMAML", "$tmp/metasgd" u 1:2 w lp lw 2 t "Meta-SGD", \\
     "$tmp/baseline" u 1:2 w lp lw 2 t "joint baseline (training loss)"
EOF
elif has e0_conv3x3; then
  ops="conv3x3 conv5x5 maxpool3x3 skip zero"
  keys="step train_loss val_loss"
  for e in 0 1 2; do for o in $ops; do keys="$keys e${e}_$o"; done; done
  columns $keys <"$log" >"$tmp/d"
  {
    echo "set terminal pngcairo size 1100,640 font \"Sans,10\""
    echo "set output \"$png\""
    echo "set multiplot layout 2,2 title \"DARTS search on MNIST: losses and softmax architecture weights per edge\""
    echo "set grid; set xlabel \"search step\""
    echo "plot \"$tmp/d\" u 1:2 w l lw 2 t \"train loss\", \"\" u 1:3 w l lw 2 t \"val loss\""
    c=4
    for e in 0 1 2; do
      line="set yrange [0:1]; set title \"edge $e\"; plot"
      sep=""
      for o in $ops; do
        line="$line$sep \"$tmp/d\" u 1:$c w l lw 2 t \"$o\""
        sep=","
        c=$((c + 1))
      done
      echo "$line"
    done
    echo "unset multiplot"
  } | gnuplot
else
  # Generic: every numeric field of the first line against the first field.
  keys="$(printf '%s\n' "$first" | tr ',{}' '\n\n\n' | sed -n 's/^ *"\([A-Za-z0-9_]*\)": *[-0-9.].*$/\1/p' | tr '\n' ' ')"
  set -- $keys
  [ $# -ge 2 ] || { echo "plot.sh: no numeric fields to plot in $log" >&2; exit 1; }
  columns "$@" <"$log" >"$tmp/d"
  n=$(($# - 1))
  {
    echo "set terminal pngcairo size 1100,$((220 * ((n + 1) / 2) + 60)) font \"Sans,10\""
    echo "set output \"$png\""
    echo "set multiplot layout $(((n + 1) / 2)),2 title \"$(basename "$log")\" noenhanced"
    echo "set grid; set xlabel \"$1\" noenhanced"
    for ((i = 2; i <= $# ; i++)); do
      echo "plot \"$tmp/d\" u 1:$i w l lw 2 t \"${!i}\" noenhanced"
    done
    echo "unset multiplot"
  } | gnuplot
fi
[ -s "$png" ] || { echo "plot.sh: gnuplot wrote no $png" >&2; exit 1; }
echo "plot.sh: wrote $png"
