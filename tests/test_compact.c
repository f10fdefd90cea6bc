/* test_compact.c — ad_tape_compact: gradients of first and second order
 * through a compacted graph equal those of the same graph uncompacted (bit
 * for bit: the same ops run in the same order on the same values), keep[]
 * pointers follow their tensors, the arena's bytes in use drop, released
 * values are refused with AD_ERR_ARG (by ops and by a rule that would read
 * one), repeated compaction (as the unroll does per step) and marks before
 * the compacted one stay usable. */
#include "autodiff/ad.h"
#include "autodiff/ad_internal.h"
#include "bl_fixtures.h"
#include "gradcheck.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define S(...) ((const int64_t[]){__VA_ARGS__})

enum { NB = 16, NI = 12, NH = 9, NO = 5 };

typedef struct {
  ad_tensor *x, *w[2], *v[2];
  int32_t y[NB];
} mlp;

static void mlp_init(mlp *p, ad_dtype dt) {
  ad_rng r;
  ad_rng_seed(&r, 7);
  ck_assert_int_eq(ad_tensor_new(&p->x, dt, 2, S(NB, NI)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&p->w[0], dt, 2, S(NI, NH)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&p->w[1], dt, 2, S(NH, NO)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&p->v[0], dt, 2, S(NI, NH)), AD_OK);
  ck_assert_int_eq(ad_tensor_new(&p->v[1], dt, 2, S(NH, NO)), AD_OK);
  ad_tensor_fill_normal(p->x, &r, 0, 1);
  for (int i = 0; i < 2; i++) {
    ad_tensor_fill_normal(p->w[i], &r, 0, 0.5);
    ad_tensor_fill_normal(p->v[i], &r, 0, 1);
    ad_requires_grad(p->w[i], 1);
  }
  for (int i = 0; i < NB; i++) p->y[i] = (int32_t)ad_rng_below(&r, NO);
}

static void mlp_free(mlp *p) {
  ad_tensor_free(p->x);
  for (int i = 0; i < 2; i++) {
    ad_tensor_free(p->w[i]);
    ad_tensor_free(p->v[i]);
  }
}

/* L = nll(log_softmax(relu(x W0) W1)) and its gradient, recorded. */
static ad_tensor *loss_and_grad(ad_tape *t, mlp *p, ad_tensor **g) {
  ad_tensor *a = ad_relu(t, ad_matmul(t, p->x, p->w[0], 0, 0));
  ad_tensor *L = ad_nll(t, ad_log_softmax(t, ad_matmul(t, a, p->w[1], 0, 0), 1), p->y, NB);
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 2, p->w, g, AD_GRAD_RECORD), AD_OK);
  return L;
}

/* H v through the recorded gradient: d/dw <g, v>. */
static void hvp_of(ad_tape *t, mlp *p, ad_tensor **g, ad_tensor **hv) {
  ad_tensor *s = ad_add(t, ad_dot(t, g[0], p->v[0]), ad_dot(t, g[1], p->v[1]));
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 2, p->w, hv, 0), AD_OK);
}

static void same_bits(const ad_tensor *a, const ad_tensor *b) {
  ck_assert_int_eq(a->size, b->size);
  for (int64_t i = 0; i < a->size; i++) ck_assert_double_eq(ad_get(a, i), ad_get(b, i));
}

static ad_tape *new_tape(void) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 1}), AD_OK);
  return t;
}

/* First and second order, f32 and f64: compacted == uncompacted. */
static void check_dtype(ad_dtype dt) {
  mlp p;
  mlp_init(&p, dt);
  ad_tape *a = new_tape(), *b = new_tape();
  ad_tensor *ga[2], *gb[2], *ha[2], *hb[2], *la = loss_and_grad(a, &p, ga);
  ad_marker m = ad_mark(b);
  ad_tensor *lb = loss_and_grad(b, &p, gb);
  ad_arena_stats before, after;
  ad_arena_stats_get(b, &before);
  ad_tensor *keep[3] = {lb, gb[0], gb[1]};
  ck_assert_int_eq(ad_tape_compact(b, m, 3, keep), AD_OK);
  ad_arena_stats_get(b, &after);
  /* Every node stays; bytes in use drop (the forward's x W0 and the
   * backward's temporaries go). */
  ck_assert_uint_eq(after.n_nodes, before.n_nodes);
  ck_assert_uint_lt(after.used, before.used);
  ck_assert_uint_eq(after.peak, before.peak);
  lb = keep[0], gb[0] = keep[1], gb[1] = keep[2];
  ck_assert_double_eq(ad_item(la), ad_item(lb));
  same_bits(ga[0], gb[0]);
  same_bits(ga[1], gb[1]);
  /* First order again through the compacted forward: dL/dw. */
  ad_tensor *da[2], *db[2];
  ck_assert_int_eq(ad_grad(a, 1, &la, NULL, 2, p.w, da, 0), AD_OK);
  ck_assert_int_eq(ad_grad(b, 1, &lb, NULL, 2, p.w, db, 0), AD_OK);
  same_bits(da[0], db[0]);
  same_bits(da[1], db[1]);
  /* Second order through the compacted recorded backward. */
  hvp_of(a, &p, ga, ha);
  hvp_of(b, &p, gb, hb);
  same_bits(ha[0], hb[0]);
  same_bits(ha[1], hb[1]);
  /* and not trivially: the HVP is nonzero */
  double n2 = 0;
  for (int64_t i = 0; i < hb[0]->size; i++) n2 += ad_get(hb[0], i) * ad_get(hb[0], i);
  ck_assert(n2 > 0);
  /* The result agrees with ad_hvp and (f64: f32 differences are too coarse
   * at this size) with central differences of the gradient. */
  const double eps = 1e-6;
  ad_tape *c = new_tape();
  ad_tensor *gp[2], *gm[2], *hc[2];
  {
    ad_tensor *gc[2];
    ad_tensor *lc = loss_and_grad(c, &p, gc);
    ck_assert_int_eq(ad_hvp(c, lc, 2, p.w, p.v, hc, 0), AD_OK);
    same_bits(hc[0], hb[0]); /* ad_hvp on a fresh tape: the same */
    same_bits(hc[1], hb[1]);
  }
  for (int i = 0; i < 2 && dt == AD_F64; i++)
    for (int64_t j = 0; j < p.w[i]->size; j++)
      ad_set(p.w[i], j, ad_get(p.w[i], j) + eps * ad_get(p.v[i], j));
  loss_and_grad(c, &p, gp);
  for (int i = 0; i < 2 && dt == AD_F64; i++)
    for (int64_t j = 0; j < p.w[i]->size; j++)
      ad_set(p.w[i], j, ad_get(p.w[i], j) - 2 * eps * ad_get(p.v[i], j));
  loss_and_grad(c, &p, gm);
  for (int i = 0; i < 2 && dt == AD_F64; i++)
    for (int64_t j = 0; j < hb[i]->size; j++) {
      double fd = (ad_get(gp[i], j) - ad_get(gm[i], j)) / (2 * eps);
      ck_assert_msg(fabs(fd - ad_get(hb[i], j)) <= 1e-5 * (1 + fabs(fd)),
                    "Hv[%d][%lld] = %g, finite differences %g", i, (long long)j, ad_get(hb[i], j),
                    fd);
    }
  ad_tape_free(c);
  ad_tape_free(a);
  ad_tape_free(b);
  mlp_free(&p);
}

START_TEST(test_same_gradients) {
  check_dtype(AD_F64);
  check_dtype(AD_F32);
}
END_TEST

/* What compaction keeps: relu's rule reads its output, so relu's input
 * (x W0) is released; the matmul with the constant x keeps neither x W0
 * nor W0 for it. A released tensor is refused by ops, with a message. */
START_TEST(test_released_refused) {
  mlp p;
  mlp_init(&p, AD_F64);
  ad_tape *t = new_tape();
  ad_marker m = ad_mark(t);
  ad_tensor *h = ad_matmul(t, p.x, p.w[0], 0, 0);
  ad_tensor *a = ad_relu(t, h);
  ad_tensor *L = ad_sum(t, a);
  ad_tensor *keep[2] = {L, a};
  ck_assert_int_eq(ad_tape_compact(t, m, 2, keep), AD_OK);
  L = keep[0], a = keep[1];
  ad_tensor *hh = a->node->in[0]; /* h, moved */
  ck_assert(hh->flags & AD_FLAG_RELEASED);
  ck_assert_ptr_null(hh->data);
  ck_assert(!(a->flags & AD_FLAG_RELEASED));
  ck_assert(isnan(ad_get(hh, 0))); /* no crash reading it */
  ck_assert_ptr_null(ad_exp(t, hh));
  ck_assert_int_eq(ad_tape_status(t), AD_ERR_ARG);
  ck_assert_msg(strstr(ad_tape_errmsg(t), "ad_exp") &&
                    strstr(ad_tape_errmsg(t), "released by ad_tape_compact"),
                "message: %s", ad_tape_errmsg(t));
  ad_tape_clear_error(t);
  /* The gradient still runs (relu's rule reads a, which stayed). */
  ad_tensor *g[1];
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 1, &p.w[0], g, 0), AD_OK);
  ad_tape *u = new_tape();
  ad_tensor *L2 = ad_sum(u, ad_relu(u, ad_matmul(u, p.x, p.w[0], 0, 0))), *g2[1];
  ck_assert_int_eq(ad_grad(u, 1, &L2, NULL, 1, &p.w[0], g2, 0), AD_OK);
  same_bits(g[0], g2[0]);
  ad_tape_free(u);
  ad_tape_free(t);
  mlp_free(&p);
}
END_TEST

/* A rule that would read a released value fails loudly: y = a b where b
 * needed no gradient when compacting, so a (read only for b's gradient)
 * was released; asking later for b's gradient is AD_ERR_ARG, not a wrong
 * number. */
START_TEST(test_rule_reads_released) {
  ad_tape *t = new_tape();
  ad_marker m = ad_mark(t);
  ad_tensor *a = ad_exp(t, ad_full(t, AD_F64, 1, S(4), 0.5));
  ad_requires_grad(a, 1);
  ad_tensor *b = ad_full(t, AD_F64, 1, S(4), 3.0);
  ad_tensor *y = ad_sum(t, ad_mul(t, a, b));
  ad_tensor *keep[3] = {y, a, b};
  ck_assert_int_eq(ad_tape_compact(t, m, 3, keep), AD_OK);
  /* a and b in keep[]: both keep values. Compact again without a. */
  ad_tensor *g[1];
  ck_assert_msg(ad_grad(t, 1, &keep[0], NULL, 1, &keep[1], g, 0) == AD_OK, "%s", ad_tape_errmsg(t));
  ck_assert_double_eq(ad_get(g[0], 2), 3.0);
  ad_tape_free(t);

  t = new_tape();
  m = ad_mark(t);
  a = ad_exp(t, ad_full(t, AD_F64, 1, S(4), 0.5));
  ad_requires_grad(a, 1);
  b = ad_full(t, AD_F64, 1, S(4), 3.0);
  ad_tensor *keep2[2] = {ad_sum(t, ad_mul(t, a, b)), b};
  ck_assert_int_eq(ad_tape_compact(t, m, 2, keep2), AD_OK);
  ad_tensor *mulnode_a = keep2[0]->node->in[0]->node->in[0];
  ck_assert(mulnode_a->flags & AD_FLAG_RELEASED); /* a: nobody reads it */
  ad_requires_grad(keep2[1], 1);                  /* b becomes a target after the fact */
  ck_assert_int_eq(ad_grad(t, 1, &keep2[0], NULL, 1, &keep2[1], g, 0), AD_ERR_ARG);
  ck_assert_msg(strstr(ad_tape_errmsg(t), "released by ad_tape_compact") &&
                    strstr(ad_tape_errmsg(t), "derivative of mul"),
                "message: %s", ad_tape_errmsg(t));
  ad_tape_free(t);
}
END_TEST

/* Repeated per-step compaction (what the unroll does): w_{k+1} = w_k -
 * 0.1 grad L(w_k) recorded for K steps, each step compacted keeping w_{k+1};
 * the hypergradient-like d L(w_K) / d w_0 equals the uncompacted one, the
 * bytes in use are lower, and rewinding to a mark before them all works. */
START_TEST(test_repeated_steps) {
  mlp p;
  mlp_init(&p, AD_F64);
  ad_tape *a = new_tape(), *b = new_tape();
  ad_tensor *w0[2] = {p.w[0], p.w[1]};
  ad_tensor *res[2][2];
  size_t used[2];
  for (int pass = 0; pass < 2; pass++) {
    ad_tape *t = pass ? b : a;
    ad_marker m0 = ad_mark(t);
    ad_tensor *w[2] = {w0[0], w0[1]};
    for (int k = 0; k < 4; k++) {
      ad_marker m = ad_mark(t);
      p.w[0] = w[0], p.w[1] = w[1];
      ad_tensor *g[2];
      loss_and_grad(t, &p, g);
      for (int i = 0; i < 2; i++) w[i] = ad_axpy(t, w[i], -0.1, g[i]);
      if (pass) ck_assert_int_eq(ad_tape_compact(t, m, 2, w), AD_OK);
    }
    p.w[0] = w[0], p.w[1] = w[1];
    ad_tensor *g[2];
    ad_tensor *L = loss_and_grad(t, &p, g);
    ad_arena_stats st;
    ad_arena_stats_get(t, &st);
    used[pass] = st.used;
    ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 2, w0, res[pass], 0), AD_OK);
    for (int i = 0; i < 2; i++) {
      ad_tensor *c = NULL;
      ck_assert_int_eq(ad_tensor_new(&c, AD_F64, res[pass][i]->ndim, res[pass][i]->shape), AD_OK);
      ad_copy_values(c, res[pass][i]);
      res[pass][i] = c;
    }
    ad_rewind(t, m0);
    ad_arena_stats_get(t, &st);
    ck_assert_uint_eq(st.n_nodes, 0);
  }
  ck_assert_uint_lt(used[1], used[0]);
  for (int i = 0; i < 2; i++) {
    same_bits(res[0][i], res[1][i]);
    ad_tensor_free(res[0][i]);
    ad_tensor_free(res[1][i]);
  }
  p.w[0] = w0[0], p.w[1] = w0[1];
  ad_tape_free(a);
  ad_tape_free(b);
  mlp_free(&p);
}
END_TEST

/* Nodes no kept tensor depends on go: z = sum(exp(x)) is dead when only
 * w = 2 exp(x) is kept; d sum(w) / dx = 2 exp(x) still. */
START_TEST(test_dead_nodes_dropped) {
  ad_tape *t = new_tape();
  ad_tensor *x = ad_full(t, AD_F64, 1, S(5), 0.3);
  ad_requires_grad(x, 1);
  ad_marker m = ad_mark(t);
  ad_tensor *y = ad_exp(t, x);
  ad_tensor *z = ad_sum(t, y);
  ad_tensor *w = ad_scale(t, y, 2.0);
  (void)z;
  ad_arena_stats st;
  ad_arena_stats_get(t, &st);
  ck_assert_uint_eq(st.n_nodes, 3);
  ck_assert_int_eq(ad_tape_compact(t, m, 1, &w), AD_OK);
  ad_arena_stats_get(t, &st);
  ck_assert_uint_eq(st.n_nodes, 2); /* exp, scale */
  ck_assert_str_eq(w->node->op->name, "scale");
  ck_assert_str_eq(w->node->in[0]->node->op->name, "exp");
  ck_assert_ptr_null(w->node->next);
  ad_tensor *s = ad_sum(t, w), *g;
  ck_assert_int_eq(ad_grad(t, 1, &s, NULL, 1, &x, &g, 0), AD_OK);
  for (int i = 0; i < 5; i++) ck_assert_double_eq_tol(ad_get(g, i), 2 * exp(0.3), 1e-15);
  ad_tape_free(t);
}
END_TEST

/* An unrecorded ad_grad frees its sweep's dead temporaries as it goes
 * (ad__sweep_collect): the gradient equals the recorded sweep's bit for bit
 * (the same rules in the same order) and the arena's peak during the call
 * is a fraction of it. f(x) = sum(tanh(... tanh(x) * c_k ...)) on 256 x 256
 * f64 (512 KiB per temporary, several per node). */
/* A 64 MiB tape and a 256 x 256 f64 input on it that requires grad. */
static ad_tape *sweep_input(uint64_t seed, ad_tensor **x) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 64}), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, seed);
  *x = ad_randn(t, AD_F64, 2, S(256, 256), &r);
  ad_requires_grad(*x, 1);
  return t;
}

START_TEST(test_sweep_collects) {
  ad_tensor *x;
  ad_tape *t = sweep_input(3, &x);
  ad_tensor *y = x;
  for (int k = 0; k < 12; k++) y = ad_mul(t, ad_tanh(t, y), ad_add_scalar(t, x, 0.1 * k));
  ad_tensor *f = ad_sum(t, y), *g[2];
  ad_arena_stats s0, s1, s2;
  size_t peak[2];
  for (int pass = 0; pass < 2; pass++) {
    ad_arena_stats_get(t, &s0);
    ad_arena_reset_peak(t);
    ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g[pass], pass ? AD_GRAD_RECORD : 0), AD_OK);
    ad_arena_stats_get(t, &s1);
    peak[pass] = s1.peak - s0.used;
  }
  same_bits(g[0], g[1]);
  ck_assert_msg(peak[0] * 2 < peak[1], "peak %zu (collected) vs %zu (recorded)", peak[0], peak[1]);
  ad_arena_stats_get(t, &s2);
  ck_assert_uint_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* The reverse of a recorded gradient step with a big and a small weight
 * (what an unrolled step's chunk VJP is): its sweep frees the small
 * weight's gradient cotangents below the big one's live adjoints, and the
 * collection leaves such small holes in place rather than sliding the
 * weight-sized blocks over them (cp_make_plan's pinning). The gradient
 * equals the recorded sweep's (no collection) bit for bit. w' = w - 0.1
 * grad L(w), L = sum((tanh(x W1) W2)^2), f = sum(w1'^2) + sum(w2'^2);
 * W1 256 x 256 f64 (512 KiB), W2 256 x 4 (8 KiB). */
START_TEST(test_sweep_collect_mixed_sizes) {
  ad_tape *t = NULL;
  ck_assert_int_eq(ad_tape_new(&t, &(ad_tape_opts){.arena_mb = 64}), AD_OK);
  ad_rng r;
  ad_rng_seed(&r, 5);
  ad_tensor *x = ad_randn(t, AD_F64, 2, S(64, 256), &r);
  ad_tensor *w[2] = {ad_randn(t, AD_F64, 2, S(256, 256), &r),
                     ad_randn(t, AD_F64, 2, S(256, 4), &r)};
  for (int i = 0; i < 2; i++) {
    ad_tensor *s = ad_scale(t, w[i], 0.05);
    w[i] = ad_detach(t, s);
    ad_requires_grad(w[i], 1);
  }
  ad_tensor *h = ad_tanh(t, ad_matmul(t, x, w[0], 0, 0));
  ad_tensor *z = ad_matmul(t, h, w[1], 0, 0);
  ad_tensor *L = ad_sum(t, ad_mul(t, z, z)), *g[2], *res[2][2];
  ck_assert_int_eq(ad_grad(t, 1, &L, NULL, 2, w, g, AD_GRAD_RECORD), AD_OK);
  ad_tensor *f = NULL;
  for (int i = 0; i < 2; i++) {
    ad_tensor *u = ad_axpy(t, w[i], -0.1, g[i]);
    ad_tensor *s = ad_sum(t, ad_mul(t, u, u));
    f = f ? ad_add(t, f, s) : s;
  }
  for (int pass = 0; pass < 2; pass++)
    ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 2, w, res[pass], pass ? AD_GRAD_RECORD : 0), AD_OK);
  for (int i = 0; i < 2; i++) same_bits(res[0][i], res[1][i]);
  ck_assert_uint_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* A collection that would move more than it frees is skipped: in the
 * sweep of f = sum(tanh(x) * exp(x)), x 256 x 256 f64, the first chance
 * comes with the product's two 512 KiB cotangents live above the dead
 * 512 KiB seed (moving 1 MiB to free 512 KiB). The sweep goes on without
 * it: the gradient equals the recorded sweep's bit for bit and the closed
 * form (1 - tanh^2 x) e^x + tanh(x) e^x. */
START_TEST(test_sweep_skips_costly_collection) {
  ad_tensor *x;
  ad_tape *t = sweep_input(9, &x);
  ad_tensor *f = ad_sum(t, ad_mul(t, ad_tanh(t, x), ad_exp(t, x))), *g[2];
  for (int pass = 0; pass < 2; pass++)
    ck_assert_int_eq(ad_grad(t, 1, &f, NULL, 1, &x, &g[pass], pass ? AD_GRAD_RECORD : 0), AD_OK);
  same_bits(g[0], g[1]);
  for (int64_t i = 0; i < x->size; i += 97) {
    double v = ad_get(x, i), th = tanh(v), want = (1 - th * th) * exp(v) + th * exp(v);
    ck_assert_double_eq_tol(ad_get(g[0], i), want, 1e-12 * (1 + fabs(want)));
  }
  ck_assert_uint_eq(ad_tape_status(t), AD_OK);
  ad_tape_free(t);
}
END_TEST

/* Bad calls: NULL tape, NULL keep, a foreign marker; an undeclared op with
 * arena attributes is refused with AD_ERR_STATE. */
START_TEST(test_bad_calls) {
  ck_assert_int_eq(ad_tape_compact(NULL, (ad_marker){0}, 0, NULL), AD_ERR_NULL);
  ad_tape *t = new_tape();
  ad_marker m = ad_mark(t);
  ck_assert_int_eq(ad_tape_compact(t, m, 1, NULL), AD_ERR_NULL);
  ad_tape_clear_error(t);
  ad_marker bad = m;
  bad.chunk = 99;
  ck_assert_int_eq(ad_tape_compact(t, bad, 0, NULL), AD_ERR_ARG);
  ad_tape_clear_error(t);
  /* Nothing after the mark: compaction is a rewind. */
  ad_tensor *x = ad_full(t, AD_F64, 1, S(3), 1.0);
  (void)x;
  ck_assert_int_eq(ad_tape_compact(t, m, 0, NULL), AD_OK);
  ad_arena_stats st;
  ad_arena_stats_get(t, &st);
  ck_assert_uint_eq(st.used, m.used);
  ad_tape_free(t);
}
END_TEST

/* bl_unroll compacts every recorded step: its hypergradient equals the
 * one from the uncompacted tape (o.keep_tape records without compacting;
 * the chunking differs, so the sums over steps are grouped differently:
 * 1e-12 relative), for SGD with per-parameter decay (the fused sgd_step),
 * momentum and Adam (generic ops), and its peak is lower. */
START_TEST(test_bl_unroll_same) {
  for (int kind = 1; kind <= 4; kind++) {
    fx_mlp c;
    fx_mlp_setup(&c, kind, 12);
    ad_tensor *ref[4];
    bl_stats st[2];
    for (int pass = 0; pass < 2; pass++) {
      ad_tape *t = fx_tape(16);
      ck_assert_msg(bl_unroll(t, &c.p, &(bl_opts){.keep_tape = !pass}, c.hg, &st[pass]) == AD_OK,
                    "%s", ad_tape_errmsg(t));
      for (int k = 0; k < c.n_lam; k++) {
        if (!pass) {
          ref[k] = fx_new(AD_F64, c.hg[k]->ndim, c.hg[k]->shape);
          ad_copy_values(ref[k], c.hg[k]);
        }
      }
      ad_tape_free(t);
    }
    double rel = fx_rel_t(c.n_lam, c.hg, ref);
    ck_assert_msg(rel <= 1e-12, "kind %d: compacted vs whole tape %g", kind, rel);
    ck_assert_msg(st[1].peak_arena_bytes < st[0].peak_arena_bytes, "kind %d: peak %zu vs %zu", kind,
                  st[1].peak_arena_bytes, st[0].peak_arena_bytes);
    for (int k = 0; k < c.n_lam; k++) ad_tensor_free(ref[k]);
    fx_mlp_free(&c);
  }
}
END_TEST

int main(void) {
  Suite *s = suite_create("compact");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, test_same_gradients);
  tcase_add_test(tc, test_released_refused);
  tcase_add_test(tc, test_rule_reads_released);
  tcase_add_test(tc, test_repeated_steps);
  tcase_add_test(tc, test_dead_nodes_dropped);
  tcase_add_test(tc, test_sweep_collects);
  tcase_add_test(tc, test_sweep_collect_mixed_sizes);
  tcase_add_test(tc, test_sweep_skips_costly_collection);
  tcase_add_test(tc, test_bad_calls);
  tcase_add_test(tc, test_bl_unroll_same);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
