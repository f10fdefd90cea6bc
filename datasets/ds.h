/* ds.h — datasets: IDX and CSV readers, synthetic tasks, batch iterators. */
#ifndef HYPERTAPE_DS_H
#define HYPERTAPE_DS_H
#include "autodiff/ad.h"
#endif
