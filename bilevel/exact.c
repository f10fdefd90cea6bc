/* exact.c — the oracle: the dense Hessian (or Gauss-Newton matrix) of
 * L_train at w_T, one curvature product per column (H e_j), solved
 * directly by LU with partial pivoting in f64:
 *   H v = grad_w L_val(w_T),  hg = dL_val/dlam|direct - (d^2 L_train / dlam dw) v.
 * Cost: N products and O(N^3) flops with N = dim(w), and N^2 doubles of
 * arena (twice: the factor and a copy for the residual) — for small
 * problems and for checking the other methods. */
#include "implicit_internal.h"

#include <math.h>
#include <string.h>

/* The largest N accepted (2 N^2 doubles = 2 GiB at 16384). */
#define BL_EXACT_MAX_N 16384

/* In-place LU with partial pivoting: P A = L U (unit L below the diagonal,
 * U on and above it), piv[k] = the row swapped into k. Returns 0, or -1
 * when a pivot is negligible against the largest entry (singular to
 * working precision). */
static int lu_factor(double *A, int64_t N, int64_t *piv) {
  double amax = 0;
  for (int64_t i = 0; i < N * N; i++) amax = fmax(amax, fabs(A[i]));
  double tiny = amax * 1e-14 * (double)N;
  if (amax == 0) return -1;
  for (int64_t k = 0; k < N; k++) {
    int64_t p = k;
    for (int64_t i = k + 1; i < N; i++)
      if (fabs(A[i * N + k]) > fabs(A[p * N + k])) p = i;
    piv[k] = p;
    if (fabs(A[p * N + k]) <= tiny) return -1;
    if (p != k)
      for (int64_t j = 0; j < N; j++) {
        double tmp = A[k * N + j];
        A[k * N + j] = A[p * N + j];
        A[p * N + j] = tmp;
      }
    double inv = 1.0 / A[k * N + k];
    for (int64_t i = k + 1; i < N; i++) {
      double l = A[i * N + k] *= inv;
      if (l == 0) continue;
      const double *uk = A + k * N;
      double *ai = A + i * N;
      for (int64_t j = k + 1; j < N; j++) ai[j] -= l * uk[j];
    }
  }
  return 0;
}

/* Solves with the factor: x holds b on entry, the solution on exit. */
static void lu_solve(const double *A, int64_t N, const int64_t *piv, double *x) {
  for (int64_t k = 0; k < N; k++)
    if (piv[k] != k) {
      double tmp = x[k];
      x[k] = x[piv[k]];
      x[piv[k]] = tmp;
    }
  for (int64_t i = 0; i < N; i++) /* L y = P b */
    for (int64_t j = 0; j < i; j++) x[i] -= A[i * N + j] * x[j];
  for (int64_t i = N - 1; i >= 0; i--) { /* U x = y */
    for (int64_t j = i + 1; j < N; j++) x[i] -= A[i * N + j] * x[j];
    x[i] /= A[i * N + i];
  }
}

/* Flat index j of the list <-> (tensor, element). */
static void list_set(int n, ad_tensor *const *x, int64_t j, double val) {
  for (int i = 0; i < n; j -= x[i]->size, i++)
    if (j < x[i]->size) {
      ad_set(x[i], j, val);
      return;
    }
}

static void list_get(int n, ad_tensor *const *x, double *out) {
  for (int i = 0; i < n; i++)
    for (int64_t j = 0; j < x[i]->size; j++) *out++ = ad_get(x[i], j);
}

ad_status bl_exact(ad_tape *t, const bl_problem *p, const bl_opts *o, ad_tensor *const *hg,
                   bl_stats *st) {
  bl_run r;
  bl_imp m;
  ad_tensor *e[NN_MAX_PARAMS], *col[NN_MAX_PARAMS], *v[NN_MAX_PARAMS];
  ad_status s = bl__begin(&r, "bl_exact", t, p, o, hg, 0);
  if (!s) s = bl__imp_begin(&m, &r);
  int64_t N = 0;
  for (int i = 0; !s && i < m.n; i++) N += m.w[i]->size;
  if (!s && N > BL_EXACT_MAX_N)
    s = bl__fail(&r, AD_ERR_ARG, "%lld parameters; the dense solve takes at most %d", (long long)N,
                 BL_EXACT_MAX_N);
  double *H = NULL, *H0 = NULL, *x = NULL, *hx = NULL;
  int64_t *piv = NULL;
  if (!s) {
    size_t nn = (size_t)N * (size_t)N;
    H = ad_arena_alloc(t, nn * sizeof *H);
    H0 = ad_arena_alloc(t, nn * sizeof *H0);
    x = ad_arena_alloc(t, (size_t)N * sizeof *x);
    hx = ad_arena_alloc(t, (size_t)N * sizeof *hx);
    piv = ad_arena_alloc(t, (size_t)N * sizeof *piv);
    s = ad_tape_status(t);
  }
  if (!s) s = bl__zeros_new(&r, m.n, m.w, e);
  if (!s) s = bl__zeros_new(&r, m.n, m.w, col);
  if (!s) s = bl__zeros_new(&r, m.n, m.w, v);
  /* Column j of H is H e_j. */
  for (int64_t j = 0; !s && j < N; j++) {
    list_set(m.n, e, j, 1.0);
    s = bl__imp_apply(&m, e, col);
    list_set(m.n, e, j, 0.0);
    list_get(m.n, col, hx);
    for (int64_t i = 0; i < N; i++) H[i * N + j] = hx[i];
  }
  if (!s) {
    /* H is symmetric; the products agree with that up to rounding, and the
     * average is the nearest symmetric matrix. */
    for (int64_t i = 0; i < N; i++)
      for (int64_t j = i + 1; j < N; j++)
        H[i * N + j] = H[j * N + i] = 0.5 * (H[i * N + j] + H[j * N + i]);
    memcpy(H0, H, (size_t)N * (size_t)N * sizeof *H);
    list_get(m.n, m.b, x);
    if (lu_factor(H, N, piv))
      s = bl__fail(&r, AD_ERR_NUMERIC,
                   "the %lld x %lld Hessian at w_T is singular to working precision "
                   "(add o->damping, or train the inner problem to a strict minimum)",
                   (long long)N, (long long)N);
  }
  if (!s) {
    lu_solve(H, N, piv, x);
    list_get(m.n, m.b, hx); /* residual ||H x - b|| with the unfactored H */
    double rr = 0;
    for (int64_t i = 0; i < N; i++) {
      double acc = -hx[i];
      for (int64_t j = 0; j < N; j++) acc += H0[i * N + j] * x[j];
      rr += acc * acc;
    }
    r.st.residual = sqrt(rr);
    r.st.iterations = 1;
    int64_t k = 0;
    for (int i = 0; i < m.n; i++)
      for (int64_t j = 0; j < v[i]->size; j++) ad_set(v[i], j, x[k++]);
    s = bl__imp_finish(&m, v, hg);
  }
  return bl__end(&r, s, st);
}
