/* linsolve.c — the implicit solvers' linear algebra over lists of tensors:
 * one-pass, vectorizable dot / linear combination / CG update, and
 * conjugate gradients against any symmetric operator (bl_linop). Used by
 * cg.c and hoag.c (A = H or G) and imaml.c (A = I + H / lambda). */
#include "implicit_internal.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- solver vector algebra */

void bl__imp_lincomb(int n, ad_tensor *const *out, double a, ad_tensor *const *x, double b,
                     ad_tensor *const *y) {
  for (int i = 0; i < n; i++) {
    int64_t m = out[i]->size;
    if (out[i]->dtype == AD_F32 && x[i]->dtype == AD_F32 && y[i]->dtype == AD_F32) {
      float *o = AD_F(out[i]), fa = (float)a, fb = (float)b;
      const float *xp = AD_F(x[i]), *yp = AD_F(y[i]);
      for (int64_t j = 0; j < m; j++) o[j] = fa * xp[j] + fb * yp[j];
    } else if (out[i]->dtype == AD_F64 && x[i]->dtype == AD_F64 && y[i]->dtype == AD_F64) {
      double *o = AD_D(out[i]);
      const double *xp = AD_D(x[i]), *yp = AD_D(y[i]);
      for (int64_t j = 0; j < m; j++) o[j] = a * xp[j] + b * yp[j];
    } else {
      for (int64_t j = 0; j < m; j++) ad_set(out[i], j, a * ad_get(x[i], j) + b * ad_get(y[i], j));
    }
  }
}

double bl__imp_cg_step(int n, ad_tensor *const *x, ad_tensor *const *r, ad_tensor *const *p,
                       ad_tensor *const *Ap, double a) {
  double rr = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = x[i]->size;
    if (x[i]->dtype == AD_F32 && r[i]->dtype == AD_F32 && p[i]->dtype == AD_F32 &&
        Ap[i]->dtype == AD_F32) {
      float *xp = AD_F(x[i]), *rp = AD_F(r[i]), fa = (float)a;
      const float *pp = AD_F(p[i]), *ap = AD_F(Ap[i]);
      for (int64_t j = 0; j < m; j++) {
        xp[j] += fa * pp[j];
        rp[j] -= fa * ap[j];
      }
    } else {
      bl__axpy(1, &x[i], a, &p[i]);
      bl__axpy(1, &r[i], -a, &Ap[i]);
    }
    rr += bl__dot(1, &r[i], &r[i]);
  }
  return rr;
}

double bl__imp_neumann_step(int n, ad_tensor *const *q, ad_tensor *const *v, double alpha,
                            ad_tensor *const *hq) {
  double qq = 0;
  for (int i = 0; i < n; i++) {
    int64_t m = q[i]->size;
    if (q[i]->dtype == AD_F32 && v[i]->dtype == AD_F32 && hq[i]->dtype == AD_F32) {
      float *qp = AD_F(q[i]), *vp = AD_F(v[i]), fa = (float)alpha;
      const float *hp = AD_F(hq[i]);
      /* The same float operations, in the same order per element, as the
       * two linear combinations this pass replaces. */
      for (int64_t j = 0; j < m; j++) {
        qp[j] = 1.0f * qp[j] + -fa * hp[j];
        vp[j] = 1.0f * vp[j] + 1.0f * qp[j];
      }
    } else {
      bl__imp_lincomb(1, &q[i], 1.0, &q[i], -alpha, &hq[i]);
      bl__imp_lincomb(1, &v[i], 1.0, &v[i], 1.0, &q[i]);
    }
    qq += bl__dot(1, &q[i], &q[i]);
  }
  return qq;
}

/* ---------------------------------------------------------------- conjugate gradients */

ad_status bl__cg(ad_tape *t, int n, bl_linop A, void *ctx, ad_tensor *const *b, ad_tensor *const *x,
                 int64_t K, double tol, int warm, bl_cg_info *info) {
  ad_tensor *r[NN_MAX_PARAMS], *p[NN_MAX_PARAMS], *Ap[NN_MAX_PARAMS];
  memset(info, 0, sizeof *info);
  for (int i = 0; i < n; i++) {
    r[i] = ad_zeros_like(t, b[i]);
    p[i] = ad_zeros_like(t, b[i]);
    Ap[i] = ad_zeros_like(t, b[i]);
    if (!r[i] || !p[i] || !Ap[i]) return ad_tape_status(t);
  }
  info->b_norm = sqrt(bl__dot(n, b, b));
  ad_status s;
  if (warm) { /* r = b - A x0 */
    if ((s = A(ctx, x, Ap))) return s;
    bl__imp_lincomb(n, r, 1.0, b, -1.0, Ap);
  } else {
    bl__zero(n, x);
    bl__copy_list(n, r, b);
  }
  bl__copy_list(n, p, r);
  double rs = bl__dot(n, r, r);
  for (int64_t k = 0; k < K; k++) {
    if (sqrt(rs) <= tol * info->b_norm) break;
    if ((s = A(ctx, p, Ap))) return s;
    double pAp = bl__dot(n, p, Ap);
    if (!isfinite(pAp)) { /* a product overflowed or met a NaN: say where */
      ad__fail(t, AD_ERR_NUMERIC,
               "conjugate gradients: p^T A p = %g at solver iteration %lld (the curvature "
               "products are not finite)",
               pAp, (long long)(k + 1));
      return AD_ERR_NUMERIC;
    }
    if (!(pAp > 0)) { /* not positive definite along p: keep x as it is */
      info->negative_curvature = 1;
      break;
    }
    double a = rs / pAp;
    double rs_new = bl__imp_cg_step(n, x, r, p, Ap, a); /* x += a p, r -= a Ap */
    if (!isfinite(rs_new)) {
      ad__fail(t, AD_ERR_NUMERIC, "conjugate gradients: ||r||^2 = %g at solver iteration %lld",
               rs_new, (long long)(k + 1));
      return AD_ERR_NUMERIC;
    }
    bl__imp_lincomb(n, p, 1.0, r, rs_new / rs, p); /* p = r + (rs_new / rs) p */
    rs = rs_new;
    info->iterations++;
  }
  info->residual = sqrt(rs);
  return AD_OK;
}
