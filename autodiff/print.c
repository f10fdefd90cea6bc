/* print.c — the teaching view: a tape as a Wengert list, and as Graphviz. */
#include "ad_internal.h"

/* Names tensors on the fly: v<id> for node outputs, the user's name or
 * "leaf"/"const" with the address for the rest. */
static const char *tname(const ad_tensor *x, char *buf, size_t len) {
  if (x->name)
    snprintf(buf, len, "%s", x->name);
  else if (x->node)
    snprintf(buf, len, "v%zu", x->node->id);
  else
    snprintf(buf, len, "%s%04x", ad_needs_grad(x) ? "leaf_" : "c_",
             (unsigned)(((uintptr_t)x >> 4) & 0xffff));
  return buf;
}

ad_status ad_tape_print(const ad_tape *t, FILE *f) {
  if (!t || !f) return ad__set_last(AD_ERR_NULL, "ad_tape_print: NULL tape or file");
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    char out[64], sh[96], attr[96] = "";
    fprintf(f, "%-8s = %s(", tname(n->out, out, sizeof out), n->op->name);
    for (int i = 0; i < n->n_in; i++) {
      char b[64];
      fprintf(f, "%s%s", i ? ", " : "", tname(n->in[i], b, sizeof b));
    }
    if (n->op->attr) n->op->attr(n, attr, sizeof attr);
    fprintf(f, "%s%s)  %s\n", attr[0] ? "; " : "", attr, ad_shape_str(n->out, sh, sizeof sh));
  }
  ad__clear_last();
  return AD_OK;
}

ad_status ad_tape_dot(const ad_tape *t, FILE *f) {
  if (!t || !f) return ad__set_last(AD_ERR_NULL, "ad_tape_dot: NULL tape or file");
  fprintf(f, "digraph tape {\n  rankdir=LR;\n  node [fontname=\"monospace\"];\n");
  for (const ad_node *n = ad__first_node(t); n; n = n->next) {
    char out[64], sh[96];
    tname(n->out, out, sizeof out);
    fprintf(f, "  \"%s\" [shape=box label=\"%s = %s\\n%s\"];\n", out, out, n->op->name,
            ad_shape_str(n->out, sh, sizeof sh));
    for (int i = 0; i < n->n_in; i++) {
      char b[64];
      tname(n->in[i], b, sizeof b);
      if (!n->in[i]->node)
        fprintf(f, "  \"%s\" [shape=ellipse%s];\n", b,
                ad_needs_grad(n->in[i]) ? " style=filled fillcolor=lightblue" : "");
      fprintf(f, "  \"%s\" -> \"%s\";\n", b, out);
    }
  }
  fprintf(f, "}\n");
  ad__clear_last();
  return AD_OK;
}
