/* fuzz_util.h — what the libFuzzer targets share: the input as a file.
 *
 * The loaders take a path, so each input is written to a memfd (a file in
 * memory, created once and truncated per input) and read back through
 * /proc/self/fd/N: the real fopen/fread (or inflate) path, at memory speed. */
#ifndef HYPERTAPE_FUZZ_UTIL_H
#define HYPERTAPE_FUZZ_UTIL_H

#define _GNU_SOURCE /* memfd_create */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* Writes n bytes to the process's one memfd and returns its path. */
static const char *fuzz_file(const uint8_t *data, size_t n) {
  static int fd = -1;
  static char path[64];
  if (fd < 0) {
    fd = memfd_create("hypertape-fuzz", 0);
    if (fd < 0) {
      perror("memfd_create");
      abort();
    }
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  }
  if (ftruncate(fd, 0) != 0 || (n && pwrite(fd, data, n, 0) != (ssize_t)n)) {
    perror("memfd write");
    abort();
  }
  return path;
}

#endif
