/* atomic_file.c — replacing a file so that a crash or a failed write leaves
 * either the old file or the new one, never half of one (ad_internal.h).
 *
 * The bytes go to a temporary file in the destination's directory (rename
 * is atomic only within one file system), are fsync'ed, and the temporary
 * is renamed over the destination; then the directory is fsync'ed so the
 * rename itself is durable. Any failure removes the temporary. Shared by
 * nn_params_save, ds_idx_write and bl_engine_save. */
#define _POSIX_C_SOURCE 200809L

#include "ad_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int ad__afile_open(ad__afile *a, const char *path) {
  static const char suffix[] = ".tmp.XXXXXX";
  a->fd = -1;
  size_t plen = strlen(path);
  a->tmp = malloc(plen + sizeof suffix);
  if (!a->tmp) return ENOMEM;
  memcpy(a->tmp, path, plen);
  memcpy(a->tmp + plen, suffix, sizeof suffix);
  a->fd = mkstemp(a->tmp);
  if (a->fd < 0) return errno ? errno : EIO;
  fchmod(a->fd, 0644); /* mkstemp makes 0600; the files written here are not secret */
  return 0;
}

/* fsyncs the directory holding path. Best effort: the data file was synced
 * already, and a directory that cannot be opened has nothing to sync. */
static void sync_dir(const char *path) {
  char dir[4096];
  const char *slash = strrchr(path, '/');
  if (!slash) {
    strcpy(dir, ".");
  } else if (slash == path) {
    strcpy(dir, "/");
  } else {
    size_t n = (size_t)(slash - path);
    if (n >= sizeof dir) return;
    memcpy(dir, path, n);
    dir[n] = 0;
  }
  int fd = open(dir, O_RDONLY);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}

int ad__afile_finish(ad__afile *a, const char *path, int err) {
  if (a->fd >= 0) {
    /* fsync on this descriptor syncs the file, whichever descriptor (a
     * dup'ed one under a FILE or gzFile) wrote it. */
    if (!err && fsync(a->fd) != 0) err = errno ? errno : EIO;
    if (close(a->fd) != 0 && !err) err = errno ? errno : EIO;
    if (!err && rename(a->tmp, path) != 0) err = errno ? errno : EIO;
    if (err)
      unlink(a->tmp);
    else
      sync_dir(path);
  }
  a->fd = -1;
  free(a->tmp);
  a->tmp = NULL;
  return err;
}
