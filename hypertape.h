/* hypertape.h — the whole library: autodiff core, nn layers and optimizers,
 * datasets, and bilevel (hypergradient) methods. Include the module headers
 * instead when you need only one layer. */
#ifndef HYPERTAPE_H
#define HYPERTAPE_H
#include "autodiff/ad.h"
#include "nn/nn.h"
#include "datasets/ds.h"
#include "bilevel/bl.h"
#include "bilevel/bl_engine.h"
#endif
