/* test_header_examples.c — the worked examples at the top of nn/nn.h and
 * bilevel/bl.h, written out as in the headers and checked against hand
 * computations, so the examples never drift from the real signatures.
 * (ad.h's example runs in test_tape.c, ds.h's in test_datasets.c.) */
#include "bilevel/bl.h"
#include "gradcheck.h"

#include <math.h>

/* nn.h: one differentiable SGD step with a learnable learning rate.
 * loss = sum(w0^2) + sum(w1^3), so g = (2 w0, 3 w1^2), w1_new = w - lr g and
 * d sum(all of w_new) / d lr = -sum(g): checked to 1e-14. */
START_TEST(test_nn_header_example) {
  ad_tape *tape = NULL;
  ck_assert_int_eq(ad_tape_new(&tape, NULL), AD_OK);
  enum { n = 2 };
  ad_tensor *w[n], *lr = ad_scalar(tape, AD_F64, 0.1);
  w[0] = ad_const(tape, AD_F64, 1, (int64_t[]){2}, (double[]){1.0, -2.0});
  w[1] = ad_const(tape, AD_F64, 1, (int64_t[]){1}, (double[]){0.5});
  ad_requires_grad(w[0], 1);
  ad_requires_grad(w[1], 1);
  ad_requires_grad(lr, 1);
  ad_tensor *loss =
      ad_add(tape, ad_dot(tape, w[0], w[0]), ad_sum(tape, ad_pow_scalar(tape, w[1], 3)));

  nn_opt_cfg cfg = {.kind = NN_OPT_SGD, .lr_var = lr}; // lr: scalar leaf
  nn_opt_state st;
  nn_opt_state_init_tape(tape, &cfg, &st, n, w);
  ad_tensor *g[n], *w1[n];
  ad_grad(tape, 1, &loss, NULL, n, w, g, AD_GRAD_RECORD);
  nn_opt_step_diff(tape, &cfg, &st, n, w, g, w1); // w1 = w - lr*g

  ck_assert_int_eq(ad_tape_status(tape), AD_OK);
  ck_assert_double_eq_tol(ad_get(w1[0], 0), 1.0 - 0.1 * 2.0, 1e-14);
  ck_assert_double_eq_tol(ad_get(w1[0], 1), -2.0 - 0.1 * -4.0, 1e-14);
  ck_assert_double_eq_tol(ad_get(w1[1], 0), 0.5 - 0.1 * 0.75, 1e-14);
  ad_tensor *s = ad_add(tape, ad_sum(tape, w1[0]), ad_sum(tape, w1[1])), *dlr;
  ck_assert_int_eq(ad_grad(tape, 1, &s, NULL, 1, &lr, &dlr, 0), AD_OK);
  ck_assert_double_eq_tol(ad_item(dlr), -(2.0 - 4.0 + 0.75), 1e-14);
  ad_tape_free(tape);
}
END_TEST

/* bl.h's usage example on a problem with a closed form:
 *   L_train(a, b; lam) = (a - lam)^2 + (b - 2)^2,  L_val = (a - 1)^2 + b^2,
 * GD with lr 0.1: a_{t+1} = 0.8 a_t + 0.2 lam, so
 *   a_T = 0.8^T a_0 + lam (1 - 0.8^T),  dL_val/dlam = 2 (a_T - 1)(1 - 0.8^T),
 * checked to 1e-12 after T = 100 steps. */
static ad_tensor *my_train(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                           void *ctx) {
  (void)step, (void)ctx;
  ad_tensor *da = ad_sub(t, w[0], lam[0]), *db = ad_add_scalar(t, w[1], -2.0);
  return ad_add(t, ad_dot(t, da, da), ad_dot(t, db, db));
}
static ad_tensor *my_val(ad_tape *t, ad_tensor *const *w, ad_tensor *const *lam, int64_t step,
                         void *ctx) {
  (void)lam, (void)step, (void)ctx;
  ad_tensor *da = ad_add_scalar(t, w[0], -1.0);
  return ad_add(t, ad_dot(t, da, da), ad_dot(t, w[1], w[1]));
}

START_TEST(test_bl_header_example) {
  ad_tape *tape = NULL;
  ck_assert_int_eq(ad_tape_new(&tape, NULL), AD_OK);
  ad_tensor *w0[2], *lam[1];
  const double a0 = 0.3, lamv = 1.7;
  ck_assert_int_eq(ad_tensor_from(&w0[0], AD_F64, 1, (int64_t[]){1}, &a0), AD_OK);
  ck_assert_int_eq(ad_tensor_from(&w0[1], AD_F64, 1, (int64_t[]){1}, (double[]){-0.4}), AD_OK);
  ck_assert_int_eq(ad_tensor_from(&lam[0], AD_F64, 1, (int64_t[]){1}, &lamv), AD_OK);
  int data = 0;

  bl_problem p = {.n_w = 2,
                  .w0 = w0,
                  .n_lam = 1,
                  .lam = lam,
                  .train_loss = my_train,
                  .val_loss = my_val,
                  .ctx = &data,
                  .opt = {.kind = NN_OPT_SGD, .lr = 0.1},
                  .inner_steps = 100};
  ad_tensor *hg[1]; // heap tensors shaped like lam, filled in
  ck_assert_int_eq(ad_tensor_new(&hg[0], AD_F64, 1, (int64_t[]){1}), AD_OK);
  bl_stats st;
  ck_assert_int_eq(bl_unroll(tape, &p, &(bl_opts){0}, hg, &st), AD_OK);

  double k = pow(0.8, 100), aT = k * a0 + lamv * (1 - k);
  ck_assert_double_eq_tol(ad_item(hg[0]), 2 * (aT - 1) * (1 - k), 1e-12);
  ck_assert_int_eq(st.inner_steps, 100);
  for (int i = 0; i < 2; i++) ad_tensor_free(w0[i]);
  ad_tensor_free(lam[0]);
  ad_tensor_free(hg[0]);
  ad_tape_free(tape);
}
END_TEST

int main(void) {
  Suite *s = suite_create("header_examples");
  TCase *tc = tcase_create("examples");
  tcase_add_test(tc, test_nn_header_example);
  tcase_add_test(tc, test_bl_header_example);
  suite_add_tcase(s, tc);
  return gc_run_suite(s);
}
