/* rundir.c: run.dir itself: created on demand and locked by the run that writes it (rank 0), so
   that two runs never write one directory. See docs/checkpoints.md ("One run per run.dir").

   The lock is flock(2) on run.dir/kdpeers.lock, held while the process lives (the kernel drops
   it when the process ends, however it ends; NFS clients turn it into an NFS lock). The file
   names its holder (host, pid, start time) for the message a second run prints. A clean end
   empties the file; a file that names a holder whose lock is free is stale (the holder died) and
   is taken over with a warning. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/serve.h"
#include "train_internal.h"

#define LOCK_NAME "kdpeers.lock"

static volatile int g_lock_fd = -1; /* read by kdp_rundir_release_now in a signal handler */

/* run.dir and its parents (the one mkdir -p of kdpeers, kdp_ckpt_mkdirs) */
static int mkdir_p(const char *path, kdp_error *err) {
  kdp_error e;
  if (kdp_ckpt_mkdirs(path, &e) != 0)
    return kdp_fail(err, KDP_EIO, "run.dir '%s': %s (set run.dir to a writable folder)", path,
                    e.msg);
  return 0;
}

/* Who holds (or held) the lock: what the file says. */
typedef struct holder {
  long pid;
  char host[256], started[64], boot_id[64], job[64];
  unsigned long long proc_start; /* field 22 of /proc/PID/stat: with boot_id, one process */
} holder;

static void read_line_file(const char *path, char *out, size_t n) {
  out[0] = 0;
  FILE *f = fopen(path, "r");
  if (!f) return;
  if (fgets(out, (int)n, f)) out[strcspn(out, "\n")] = 0;
  fclose(f);
}

/* start time of process pid in clock ticks after boot; 0 if it does not exist or has ended (a
   zombie, or dead) */
static unsigned long long proc_start_of(long pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  read_line_file(path, buf, sizeof buf);
  const char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  if (!p) return 0;
  unsigned long long v = 0;
  char state = 0;
  /* after ") ": field 3 (state) ... field 22 (starttime) */
  if (sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d "
                    "%llu", &state, &v) != 2)
    return 0;
  return state == 'Z' || state == 'X' ? 0 : v;
}

static void me(holder *h) {
  memset(h, 0, sizeof *h);
  h->pid = (long)getpid();
  if (gethostname(h->host, sizeof h->host - 1) != 0) snprintf(h->host, sizeof h->host, "?");
  time_t now = time(NULL);
  struct tm tm;
  localtime_r(&now, &tm);
  strftime(h->started, sizeof h->started, "%Y-%m-%d %H:%M:%S %z", &tm);
  read_line_file("/proc/sys/kernel/random/boot_id", h->boot_id, sizeof h->boot_id);
  const char *job = getenv("SLURM_JOB_ID");
  snprintf(h->job, sizeof h->job, "%s", job ? job : "");
  h->proc_start = proc_start_of(h->pid);
}

static int parse_holder(int fd, holder *h) {
  char buf[2048];
  memset(h, 0, sizeof *h);
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return 0;
  buf[n] = 0;
  for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
    char *eq = strchr(line, '=');
    if (!eq) continue;
    *eq = 0;
    const char *k = line, *v = eq + 1;
    if (strcmp(k, "pid") == 0) h->pid = atol(v);
    else if (strcmp(k, "host") == 0) snprintf(h->host, sizeof h->host, "%s", v);
    else if (strcmp(k, "started") == 0) snprintf(h->started, sizeof h->started, "%s", v);
    else if (strcmp(k, "boot_id") == 0) snprintf(h->boot_id, sizeof h->boot_id, "%s", v);
    else if (strcmp(k, "slurm_job") == 0) snprintf(h->job, sizeof h->job, "%s", v);
    else if (strcmp(k, "proc_start") == 0) h->proc_start = strtoull(v, NULL, 10);
  }
  return h->pid > 0;
}

static void describe(const holder *h, char *out, size_t n) {
  snprintf(out, n, "pid %ld on host %s, started %s%s%s%s", h->pid, h->host, h->started,
           h->job[0] ? " (Slurm job " : "", h->job, h->job[0] ? ")" : "");
}

/* The holder is this machine's process that wrote the file, and it still runs. */
static int alive_here(const holder *h, const holder *self) {
  if (strcmp(h->host, self->host) != 0 || strcmp(h->boot_id, self->boot_id) != 0) return 0;
  unsigned long long start = proc_start_of(h->pid);
  return start != 0 && (h->proc_start == 0 || start == h->proc_start);
}

/* The named holder still runs on this host although its lock is free: it may be ending right
   now (the kernel drops its locks before the process is gone). Waits up to 3 s for that. */
static int still_alive_here(const holder *h, const holder *self) {
  for (int i = 0; i < 60; i++) {
    if (!alive_here(h, self)) return 0;
    usleep(50000);
  }
  return 1;
}

static int write_holder(int fd, const holder *h, kdp_error *err, const char *path) {
  char buf[1024];
  int n = snprintf(buf, sizeof buf,
                   "# kdpeers: this run.dir is in use while a kdpeers process holds a lock on "
                   "this file\npid=%ld\nhost=%s\nstarted=%s\nslurm_job=%s\nboot_id=%s\n"
                   "proc_start=%llu\n",
                   h->pid, h->host, h->started, h->job, h->boot_id, h->proc_start);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)n, 0) != n)
    return kdp_fail(err, KDP_EIO, "cannot write the lock file %s: %s", path, strerror(errno));
  return 0;
}

/* Rank 0: takes run.dir's lock, or says who holds it (KDP_EBUSY). */
static int lock_dir(const char *dir, kdp_error *err) {
  char path[KDP_PATH + 32], who[KDP_PATH + 512];
  snprintf(path, sizeof path, "%s/" LOCK_NAME, dir);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    return kdp_fail(err, KDP_EIO, "cannot open the lock file %s: %s", path, strerror(errno));
  holder self, h;
  me(&self);
  /* a holder that is ending (killed a moment ago) still holds it: give it up to 3 s */
  int locked = 0, why = 0;
  for (int i = 0; i < 60; i++) {
    locked = flock(fd, LOCK_EX | LOCK_NB) == 0;
    why = errno;
    if (locked || (why != EWOULDBLOCK && why != EINTR)) break;
    usleep(50000);
  }
  if (!locked && (why == EWOULDBLOCK || why == EINTR)) {
    /* the holder writes its name right after it locks: give it a moment */
    for (int i = 0; i < 50 && !parse_holder(fd, &h); i++) usleep(10000);
    if (h.pid > 0)
      describe(&h, who, sizeof who);
    else
      snprintf(who, sizeof who, "a process that has not written its name into %s", path);
    close(fd);
    return kdp_fail(err, KDP_EBUSY,
                    "run.dir %s is in use by another kdpeers run: %s. Wait for it to end or stop "
                    "it, or choose another run.dir (-s run.dir=...)",
                    dir, who);
  }
  int named = parse_holder(fd, &h);
  if (named) describe(&h, who, sizeof who);
  if (named && h.pid != self.pid && still_alive_here(&h, &self)) {
    /* it runs, yet its lock is free: this file system does not lock (or not between mounts) */
    close(fd);
    return kdp_fail(err, KDP_EBUSY,
                    "run.dir %s is in use by another kdpeers run: %s, still running (its lock "
                    "on %s is not seen here: %s). Wait for it to end or stop it, or choose "
                    "another run.dir (-s run.dir=...)",
                    dir, who, path, locked ? "the file system does not share it" : strerror(why));
  }
  if (!locked) {
    if (named && strcmp(h.host, self.host) != 0) {
      close(fd);
      return kdp_fail(err, KDP_EBUSY,
                      "run.dir %s may be in use by another kdpeers run: %s. This file system "
                      "cannot lock (%s), so kdpeers cannot tell whether that run still goes on; "
                      "if it has ended, delete %s and start again",
                      dir, who, strerror(why), path);
    }
    fprintf(stderr,
            "kdpeers: warning: cannot lock %s (%s): this file system does not support flock; "
            "only the lock file's contents keep a second run out of run.dir\n",
            path, strerror(why));
  }
  if (named && h.pid != self.pid)
    fprintf(stderr,
            "kdpeers: warning: taking over the stale lock of run.dir %s: it names %s, which %s\n",
            dir, who,
            strcmp(h.host, self.host) == 0
                ? "is no longer running"
                : "runs on another host and no longer holds the lock (it ended, or its node "
                  "died and the file system released its lock)");
  int rc = write_holder(fd, &self, err, path);
  if (rc != 0) {
    close(fd);
    return rc;
  }
  g_lock_fd = fd;
  return 0;
}

int kdp_rundir_open(const kdp_config *cfg, kdp_dist *d, int serve_only, kdp_error *err) {
  int rc = 0;
  if (d->world_rank == 0) {
    /* server.listen was checked by kdp_config_validate, before anything is written */
    rc = mkdir_p(cfg->dir, err);
    /* kdpeers serve only reads the run (it may be training right now) */
    if (rc == 0 && !serve_only) rc = lock_dir(cfg->dir, err);
  }
  int32_t code = rc;
  kdp_dist_bcast(d, &code, sizeof code);
  if (code != 0 && d->world_rank != 0)
    rc = kdp_fail(err, code, "rank 0 could not open run.dir %s (see its message)", cfg->dir);
  return rc;
}

void kdp_rundir_release_now(void) {
  int fd = g_lock_fd;
  if (fd < 0) return;
  g_lock_fd = -1;
  if (ftruncate(fd, 0) != 0) { /* async-signal-safe: an emptied file is a released lock */
  }
  close(fd);
}
