/* bl.h — hypergradient methods as compositions of tape operations. */
#ifndef HYPERTAPE_BL_H
#define HYPERTAPE_BL_H
#include "autodiff/ad.h"
#include "nn/nn.h"
#endif
