/* data_dir.c — where the embedded MNIST subset is, in a build tree and in
 * an installed prefix (see ds_default_mnist_dir in ds.h). */
#define _GNU_SOURCE /* dladdr */
#include "datasets/ds_internal.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Set by CMake: the installed data directory (absolute, as configured),
 * the same directory relative to the installed library's directory, and
 * the source tree's copy for programs run from a build tree. */
#ifndef HT_DATA_DIR
#define HT_DATA_DIR "/usr/local/share/hypertape/mnist"
#endif
#ifndef HT_LIB_TO_DATA
#define HT_LIB_TO_DATA "../share/hypertape/mnist"
#endif

static char g_dir[4096];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* The embedded set is there when its training images are. */
static int has_mnist(const char *dir) {
  char p[4200];
  struct stat st;
  snprintf(p, sizeof p, "%s/train-images-idx3-ubyte.gz", dir);
  return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static void find_dir(void) {
  /* 1. Next to the library itself: <libdir>/../share/hypertape/mnist. This
   * is what makes an installed prefix relocatable (moved, or installed
   * with `cmake --install --prefix P` after configuring for another
   * prefix). For libhypertape.so it is the .so's directory; linked
   * statically, the program's, which finds the data when the program sits
   * in the prefix (bin/ and lib/ are siblings). */
  Dl_info info;
  if (dladdr((const void *)g_dir, &info) && info.dli_fname && strchr(info.dli_fname, '/')) {
    const char *slash = strrchr(info.dli_fname, '/');
    char cand[sizeof g_dir];
    int n = snprintf(cand, sizeof cand, "%.*s/%s", (int)(slash - info.dli_fname), info.dli_fname,
                     HT_LIB_TO_DATA);
    if (n > 0 && (size_t)n < sizeof cand && has_mnist(cand)) {
      memcpy(g_dir, cand, (size_t)n + 1);
      return;
    }
  }
  /* 2. The source tree, for programs run uninstalled from a build tree: its
   * own data wins over whatever copy an older install left behind. */
#ifdef HT_SOURCE_DIR
  if (has_mnist(HT_SOURCE_DIR "/datasets/mnist")) {
    snprintf(g_dir, sizeof g_dir, "%s", HT_SOURCE_DIR "/datasets/mnist");
    return;
  }
#endif
  /* 3. The configured install location (a statically linked program
   * anywhere on the machine); also the name errors give when none exists. */
  snprintf(g_dir, sizeof g_dir, "%s", HT_DATA_DIR);
}

const char *ds_default_mnist_dir(void) {
  const char *env = getenv("HYPERTAPE_DATA");
  if (env && *env) return env;
  pthread_once(&g_once, find_dir);
  return g_dir;
}
