/* print.c — the teaching view: a tape as a Wengert list, and as Graphviz.
 *
 * Both views name tensors the same way, from the tape's order alone (never
 * from addresses), so a program prints the same bytes on every run: node
 * outputs v<k> for the k-th node on the tape, leaves leaf<k> and constants
 * c<k> in order of first use. A tensor the user named shows its name. */
#include "ad_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { K_NODE, K_LEAF, K_CONST };

typedef struct {
  const ad_tensor *x;
  size_t idx;  /* v<idx>, leaf<idx> or c<idx> */
  int kind;    /* K_* */
  int dup;     /* another leaf/constant has the same name: use the generated id */
  int defined; /* already declared in the output */
} ent;

/* Open-addressing map tensor -> ent, sized once for every tensor the tape
 * mentions (at most one output and n_in inputs per node). */
typedef struct {
  ent *e;
  size_t mask, n_leaf, n_const, n_node;
  int any_label, any_phase;
} names;

static size_t slot_of(const names *m, const ad_tensor *x) {
  size_t h = (size_t)(((uintptr_t)x >> 4) * 0x9E3779B97F4A7C15ull);
  for (size_t i = h & m->mask;; i = (i + 1) & m->mask)
    if (m->e[i].x == x || !m->e[i].x) return i;
}

/* The entry for x, made at first sight: node outputs get the index of their
 * node (passed as k), leaves and constants the next number of their kind. */
static ent *see(names *m, const ad_tensor *x, size_t k) {
  ent *e = &m->e[slot_of(m, x)];
  if (e->x) return e;
  e->x = x;
  if (x->node) {
    e->kind = K_NODE;
    e->idx = k;
  } else if (ad_needs_grad(x)) {
    e->kind = K_LEAF;
    e->idx = m->n_leaf++;
  } else {
    e->kind = K_CONST;
    e->idx = m->n_const++;
  }
  return e;
}

/* Builds the map in tape order, then marks leaves and constants whose name
 * is shared (two "lr" scalars must stay two nodes in the DOT graph). */
static ad_status names_build(const ad_tape *t, names *m, const char *fn) {
  memset(m, 0, sizeof *m);
  size_t need = 0, k = 0;
  for (const ad_node *n = ad__first_node(t); n; n = n->next) need += (size_t)n->n_in + 1;
  size_t cap = 16;
  while (cap < 2 * need) cap *= 2;
  m->e = calloc(cap, sizeof *m->e);
  if (!m->e) return ad__set_last(AD_ERR_NOMEM, "%s: cannot allocate %zu name slots", fn, cap);
  m->mask = cap - 1;
  for (const ad_node *n = ad__first_node(t); n; n = n->next, k++) {
    for (int i = 0; i < n->n_in; i++) see(m, n->in[i], SIZE_MAX);
    see(m, n->out, k);
    m->any_label |= n->label != NULL;
    m->any_phase |= n->phase != AD_PHASE_FORWARD;
  }
  m->n_node = k;
  /* Named leaves and constants are few: a quadratic check over them only. */
  for (size_t i = 0; i < cap; i++) {
    ent *a = &m->e[i];
    if (!a->x || a->kind == K_NODE || !a->x->name || a->dup) continue;
    for (size_t j = i + 1; j < cap; j++) {
      ent *b = &m->e[j];
      if (b->x && b->kind != K_NODE && b->x->name && !strcmp(a->x->name, b->x->name))
        a->dup = b->dup = 1;
    }
  }
  return AD_OK;
}

static ent *lookup(names *m, const ad_tensor *x) {
  return &m->e[slot_of(m, x)];
}

/* Generated, always unique id; a unique user name for leaves and constants
 * (so a graph names its parameters "w", "lam"). */
static const char *ent_id(const ent *e, char *buf, size_t len) {
  static const char *prefix[] = {"v", "leaf", "c"};
  if (e->kind != K_NODE && e->x->name && !e->dup)
    snprintf(buf, len, "%s", e->x->name);
  else if (e->idx == SIZE_MAX)
    snprintf(buf, len, "v?"); /* an input whose node is not on this tape */
  else
    snprintf(buf, len, "%s%zu", prefix[e->kind], e->idx);
  return buf;
}

/* What a reader sees: the user's name when there is one, else the id. */
static const char *ent_disp(const ent *e, char *buf, size_t len) {
  if (e->x->name) {
    snprintf(buf, len, "%s", e->x->name);
    return buf;
  }
  return ent_id(e, buf, len);
}

static int is_scalar(const ad_tensor *x) {
  return x->size == 1;
}

static const char *phase_name(unsigned p) {
  return p == AD_PHASE_FORWARD    ? "forward"
         : p == AD_PHASE_BACKWARD ? "recorded backward"
                                  : "second-order sweep (hypergradient)";
}

/* ------------------------------------------------------------------ text */

ad_status ad_tape_print(const ad_tape *t, FILE *f) {
  if (!t || !f) return ad__set_last(AD_ERR_NULL, "ad_tape_print: NULL tape or file");
  names m;
  ad_status s = names_build(t, &m, "ad_tape_print");
  if (s != AD_OK) return s;
  const char *cur_label = NULL;
  unsigned cur_phase = AD_PHASE_FORWARD;
  int first = 1;
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    char out[64], sh[96], attr[96] = "", b[64];
    if ((m.any_label || m.any_phase) &&
        (first || n->phase != cur_phase ||
         (n->label != cur_label && (!n->label || !cur_label || strcmp(n->label, cur_label))))) {
      if (n->label)
        fprintf(f, "# %s: %s\n", n->label, phase_name(n->phase));
      else
        fprintf(f, "# %s\n", phase_name(n->phase));
      cur_label = n->label;
      cur_phase = n->phase;
    }
    first = 0;
    /* Leaves and constants are defined on a line before their first use,
     * so the list reads top to bottom like a program. */
    for (int i = 0; i < n->n_in; i++) {
      ent *e = lookup(&m, n->in[i]);
      if (e->kind == K_NODE || e->defined) continue;
      e->defined = 1;
      fprintf(f, "%-8s = %s", ent_disp(e, b, sizeof b), e->kind == K_LEAF ? "leaf" : "const");
      if (is_scalar(e->x)) fprintf(f, " %.6g", ad_get(e->x, 0));
      fprintf(f, "  %s\n", ad_shape_str(e->x, sh, sizeof sh));
    }
    fprintf(f, "%-8s = %s(", ent_disp(lookup(&m, n->out), out, sizeof out), n->op->name);
    for (int i = 0; i < n->n_in; i++)
      fprintf(f, "%s%s", i ? ", " : "", ent_disp(lookup(&m, n->in[i]), b, sizeof b));
    if (n->op->attr) n->op->attr(n, attr, sizeof attr);
    fprintf(f, "%s%s)  %s\n", attr[0] ? "; " : "", attr, ad_shape_str(n->out, sh, sizeof sh));
  }
  free(m.e);
  ad__clear_last();
  return AD_OK;
}

/* ------------------------------------------------------------------ labels */

ad_status ad_tape_label(ad_tape *t, ad_marker from, const char *label) {
  if (!t || !label) return ad__set_last(AD_ERR_NULL, "ad_tape_label: NULL tape or label");
  ad_arena_stats st;
  ad_arena_stats_get(t, &st);
  if (from.n_nodes > st.n_nodes)
    return ad__set_last(AD_ERR_ARG,
                        "ad_tape_label: the mark is at node %zu but the tape has %zu nodes "
                        "(a mark from before a rewind?)",
                        from.n_nodes, st.n_nodes);
  ad_node *n = from.last ? from.last->next : ad__first_node(t);
  for (; n; n = n->next)
    if (!n->label) n->label = label;
  ad__clear_last();
  return AD_OK;
}

/* ------------------------------------------------------------------ DOT */

/* Writes s into a DOT string, escaping what DOT would read. */
static void put_esc(FILE *f, const char *s) {
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') fputc('\\', f);
    fputc(*s, f);
  }
}

static int is_output(const ad_dot_opts *o, const ad_tensor *x) {
  for (int i = 0; i < o->n_outputs; i++)
    if (o->outputs[i] == x) return 1;
  return 0;
}

#define OUT_STYLE " color=\"#d00000\" penwidth=3 peripheries=2"

/* A leaf or constant: scalars show their value, others their shape. */
static void dot_value_node(FILE *f, const ent *e, const ad_dot_opts *o, const char *indent) {
  char id[64], d[64], sh[96];
  fprintf(f, "%s\"", indent);
  put_esc(f, ent_id(e, id, sizeof id));
  fprintf(f, "\" [label=\"");
  put_esc(f, ent_disp(e, d, sizeof d));
  if (is_scalar(e->x)) fprintf(f, " = %.6g", ad_get(e->x, 0));
  fprintf(f, "\\n%s\"", ad_shape_str(e->x, sh, sizeof sh));
  if (e->kind == K_LEAF)
    fprintf(f, " shape=ellipse style=filled fillcolor=\"#cfe3ff\"");
  else
    fprintf(f, " shape=ellipse color=gray50 fontcolor=gray25 fontsize=10");
  fprintf(f, "%s];\n", is_output(o, e->x) ? OUT_STYLE : "");
}

static const char *phase_style(unsigned p) {
  switch (p) {
  case AD_PHASE_FORWARD:
    return "shape=box";
  case AD_PHASE_BACKWARD:
    return "shape=box style=\"rounded,filled\" fillcolor=\"#fff1b8\"";
  default:
    return "shape=box style=\"filled,bold\" fillcolor=\"#f8c4bc\"";
  }
}

static const char *phase_edge(unsigned p) {
  return p == AD_PHASE_FORWARD ? "black" : p == AD_PHASE_BACKWARD ? "\"#a07800\"" : "\"#c0392b\"";
}

static void dot_legend(FILE *f, unsigned phases, int any_leaf, int any_const, int any_out) {
  fprintf(f, "  subgraph cluster_legend {\n    label=\"legend\"; style=dashed; color=gray60;\n"
             "    node [fontsize=10];\n");
  const char *prev = NULL;
  static const char *key[] = {"legend_forward", "legend_backward", "legend_second"};
  for (unsigned p = 0; p < 3; p++) {
    if (!(phases & (1u << p))) continue;
    fprintf(f, "    %s [label=\"%s op\" %s];\n", key[p], phase_name(p), phase_style(p));
    if (prev) fprintf(f, "    %s -> %s [style=invis];\n", prev, key[p]);
    prev = key[p];
  }
  if (any_leaf) {
    fprintf(f, "    legend_leaf [label=\"leaf (needs a gradient)\" shape=ellipse style=filled "
               "fillcolor=\"#cfe3ff\"];\n");
    if (prev) fprintf(f, "    %s -> legend_leaf [style=invis];\n", prev);
    prev = "legend_leaf";
  }
  if (any_const) {
    fprintf(f, "    legend_const [label=\"constant: value or shape\" shape=ellipse color=gray50 "
               "fontcolor=gray25];\n");
    if (prev) fprintf(f, "    %s -> legend_const [style=invis];\n", prev);
    prev = "legend_const";
  }
  if (any_out) {
    fprintf(f, "    legend_output [label=\"output\" shape=box" OUT_STYLE "];\n");
    if (prev) fprintf(f, "    %s -> legend_output [style=invis];\n", prev);
    prev = "legend_output";
  }
  fprintf(f, "    legend_edges [label=\"edge numbers: operand order\\nsub: 0 - 1\" "
             "shape=plaintext];\n");
  if (prev) fprintf(f, "    %s -> legend_edges [style=invis];\n", prev);
  fprintf(f, "  }\n");
}

ad_status ad_tape_dot_ex(const ad_tape *t, FILE *f, const ad_dot_opts *opts) {
  if (!t || !f) return ad__set_last(AD_ERR_NULL, "ad_tape_dot: NULL tape or file");
  ad_dot_opts o = opts ? *opts : (ad_dot_opts){0};
  if (!o.rankdir) o.rankdir = "TB";
  static const char *dirs[] = {"TB", "LR", "BT", "RL"};
  int ok = 0;
  for (int i = 0; i < 4; i++) ok |= !strcmp(o.rankdir, dirs[i]);
  if (!ok)
    return ad__set_last(AD_ERR_ARG, "ad_tape_dot_ex: rankdir \"%s\" is not TB, LR, BT or RL",
                        o.rankdir);
  if (o.n_outputs < 0 || (o.n_outputs > 0 && !o.outputs))
    return ad__set_last(o.n_outputs < 0 ? AD_ERR_ARG : AD_ERR_NULL,
                        "ad_tape_dot_ex: %d outputs and outputs %s", o.n_outputs,
                        o.outputs ? "given" : "NULL");
  for (int i = 0; i < o.n_outputs; i++)
    if (!o.outputs[i]) return ad__set_last(AD_ERR_NULL, "ad_tape_dot_ex: output %d is NULL", i);
  names m;
  ad_status s = names_build(t, &m, "ad_tape_dot_ex");
  if (s != AD_OK) return s;

  fprintf(f, "digraph tape {\n  rankdir=%s;\n  nodesep=0.2; ranksep=0.3;\n", o.rankdir);
  if (o.title) {
    fprintf(f, "  labelloc=t; fontsize=16; label=\"");
    put_esc(f, o.title);
    fprintf(f, "\";\n");
  }
  fprintf(f, "  node [fontname=\"monospace\" fontsize=11];\n  edge [fontsize=9];\n");

  /* Leaves first, outside every cluster: they are shared by all steps. */
  unsigned phases = 0;
  int any_leaf = 0, any_const = 0, any_out = 0;
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    phases |= 1u << (n->phase > 2 ? 2 : n->phase);
    any_out |= is_output(&o, n->out);
    for (int i = 0; i < n->n_in; i++) {
      ent *e = lookup(&m, n->in[i]);
      any_out |= is_output(&o, e->x);
      if (e->kind == K_CONST) any_const = 1;
      if (e->kind != K_LEAF || e->defined) continue;
      e->defined = any_leaf = 1;
      dot_value_node(f, e, &o, "  ");
    }
  }

  const char *cur = NULL;
  size_t n_cluster = 0;
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    const char *lab = o.no_clusters ? NULL : n->label;
    if (lab != cur && (!lab || !cur || strcmp(lab, cur))) {
      if (cur) fprintf(f, "  }\n");
      if (lab) {
        fprintf(f, "  subgraph cluster_%zu {\n    label=\"", n_cluster++);
        put_esc(f, lab);
        fprintf(f, "\"; style=rounded; color=gray40; fontsize=14;\n");
      }
      cur = lab;
    }
    const char *ind = cur ? "    " : "  ";
    /* A constant is declared just before its first use, so it sits in the
     * cluster of the step that made it. */
    for (int i = 0; i < n->n_in; i++) {
      ent *e = lookup(&m, n->in[i]);
      if (e->kind != K_CONST || e->defined) continue;
      e->defined = 1;
      dot_value_node(f, e, &o, ind);
    }
    ent *eo = lookup(&m, n->out);
    char id[64], d[64], sh[96], attr[96] = "";
    ent_id(eo, id, sizeof id);
    fprintf(f, "%s\"%s\" [label=\"", ind, id);
    put_esc(f, ent_disp(eo, d, sizeof d));
    fprintf(f, " = ");
    put_esc(f, n->op->name);
    fprintf(f, "\\n");
    if (n->op->attr) n->op->attr(n, attr, sizeof attr);
    if (attr[0]) {
      put_esc(f, attr);
      fprintf(f, "\\n");
    }
    fprintf(f, "%s", ad_shape_str(n->out, sh, sizeof sh));
    if (is_scalar(n->out)) fprintf(f, " = %.6g", ad_get(n->out, 0));
    fprintf(f, "\" %s%s];\n", phase_style(n->phase), is_output(&o, n->out) ? OUT_STYLE : "");
  }
  if (cur) fprintf(f, "  }\n");
  /* Edges after the clusters: an edge written inside a subgraph would make
   * both ends members of it (a leaf or an earlier step's output too). */
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    char id[64], b[64];
    ent_id(lookup(&m, n->out), id, sizeof id);
    for (int i = 0; i < n->n_in; i++) {
      fprintf(f, "  \"");
      put_esc(f, ent_id(lookup(&m, n->in[i]), b, sizeof b));
      fprintf(f, "\" -> \"%s\" [color=%s", id, phase_edge(n->phase));
      if (n->n_in > 1) fprintf(f, " label=\"%d\"", i);
      fprintf(f, "];\n");
    }
  }
  if (!o.no_legend && m.n_node > 0) dot_legend(f, phases, any_leaf, any_const, any_out);
  fprintf(f, "}\n");
  free(m.e);
  ad__clear_last();
  return AD_OK;
}

ad_status ad_tape_dot(const ad_tape *t, FILE *f) {
  return ad_tape_dot_ex(t, f, NULL);
}

size_t ad__buf_put(char *buf, size_t len, size_t cap, const char *fmt, ...) {
  if (len >= cap) return len;
  va_list ap;
  va_start(ap, fmt);
  int w = vsnprintf(buf + len, cap - len, fmt, ap);
  va_end(ap);
  return w < 0 ? cap : len + (size_t)w;
}
