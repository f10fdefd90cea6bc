/* sinusoid.c — the sinusoid regression tasks of MAML (Finn, Abbeel, Levine
 * 2017, section 5.1): y = A sin(x + phase), A ~ U[0.1, 5], phase ~ U[0, pi],
 * x ~ U[-5, 5]. Tasks and points are drawn into caller memory, so a
 * meta-training loop samples thousands of tasks without allocating. */
#include "datasets/ds_internal.h"

#include <math.h>

static const double ds_pi = 3.14159265358979323846;

ad_status ds_sine_task_sample(ds_sine_task *task, ad_rng *r) {
  ds_enter(__func__);
  if (!task || !r) return ds_fail(AD_ERR_NULL, "ds_sine_task_sample: NULL argument");
  task->amplitude = DS_SINE_AMP_MIN + (DS_SINE_AMP_MAX - DS_SINE_AMP_MIN) * ad_rng_uniform(r);
  task->phase = ds_pi * ad_rng_uniform(r);
  return AD_OK;
}

static ad_status check_xy(const char *fn, const ds_sine_task *task, const ad_tensor *x,
                          const ad_tensor *y) {
  if (!task || !x || !y || !x->data || !y->data)
    return ds_fail(AD_ERR_NULL, "%s: NULL argument", fn);
  if (!isfinite(task->amplitude) || !isfinite(task->phase))
    return ds_fail(AD_ERR_ARG, "%s: task amplitude %g and phase %g must be finite", fn,
                   task->amplitude, task->phase);
  if (!ds_dtype_ok(x->dtype) || !ds_dtype_ok(y->dtype))
    return ds_fail(AD_ERR_DTYPE, "%s: x and y must be f32 or f64", fn);
  if (x->size != y->size) {
    char a[64], b[64];
    return ds_fail(AD_ERR_SHAPE, "%s: x %s and y %s differ in size", fn,
                   ad_shape_str(x, a, sizeof a), ad_shape_str(y, b, sizeof b));
  }
  return AD_OK;
}

ad_status ds_sine_task_points(const ds_sine_task *task, ad_rng *r, ad_tensor *x, ad_tensor *y) {
  ds_enter(__func__);
  if (!r) return ds_fail(AD_ERR_NULL, "ds_sine_task_points: rng is NULL");
  ad_status s = check_xy("ds_sine_task_points", task, x, y);
  if (s != AD_OK) return s;
  for (int64_t i = 0; i < x->size; i++) {
    double xi = DS_SINE_X_MIN + (DS_SINE_X_MAX - DS_SINE_X_MIN) * ad_rng_uniform(r);
    ds_put(x, i, xi);
    /* y from the value as stored, so an f32 x and its y agree exactly. */
    ds_put(y, i, task->amplitude * sin(ds_at(x, i) + task->phase));
  }
  return AD_OK;
}

ad_status ds_sine_task_eval(const ds_sine_task *task, const ad_tensor *x, ad_tensor *y) {
  ds_enter(__func__);
  ad_status s = check_xy("ds_sine_task_eval", task, x, y);
  if (s != AD_OK) return s;
  for (int64_t i = 0; i < x->size; i++)
    ds_put(y, i, task->amplitude * sin(ds_at(x, i) + task->phase));
  return AD_OK;
}
