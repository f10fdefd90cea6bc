/* nn.h — layers, losses, parameter sets and differentiable optimizers. */
#ifndef HYPERTAPE_NN_H
#define HYPERTAPE_NN_H
#include "autodiff/ad.h"
#endif
