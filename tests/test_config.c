/* test_config.c: check suite "config": defaults, INI files, -s overrides, env vars, round trips,
   the generated reference files, and one test per error class. */
#include <check.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/config.h"
#include "testutil.h"

/* ---- helpers -------------------------------------------------------------------------------- */

static char *tmpdir_path;
static char tmpfile_path[4096];
static int tmp_count;

static void setup(void) {
  tmpdir_path = kdp_test_tmpdir();
  tmp_count = 0;
}

static void teardown(void) {
  char p[4096];
  for (int i = 0; i < tmp_count; i++) {
    snprintf(p, sizeof p, "%s/cfg%d.ini", tmpdir_path, i);
    unlink(p);
  }
  rmdir(tmpdir_path);
  free(tmpdir_path);
}

/* Writes text to a fresh file in the test's temp dir; returns its path (static buffer). */
static const char *write_ini(const char *text) {
  snprintf(tmpfile_path, sizeof tmpfile_path, "%s/cfg%d.ini", tmpdir_path, tmp_count++);
  FILE *f = fopen(tmpfile_path, "w");
  ck_assert_msg(f != NULL, "cannot create %s", tmpfile_path);
  fputs(text, f);
  fclose(f);
  return tmpfile_path;
}

static char *print_to_string(const kdp_config *c) {
  char *buf = NULL;
  size_t n = 0;
  FILE *f = open_memstream(&buf, &n);
  kdp_config_print(c, f);
  fclose(f);
  return buf;
}

static char *keys_to_string(int fmt) {
  char *buf = NULL;
  size_t n = 0;
  FILE *f = open_memstream(&buf, &n);
  kdp_config_print_keys_fmt(f, fmt);
  fclose(f);
  return buf;
}

static char *read_whole(const char *path) { return kdp_test_read_file(path, NULL); }

#define assert_has(msg, needle)                                                                  \
  ck_assert_msg(strstr((msg), (needle)) != NULL, "message \"%s\" lacks \"%s\"", (msg), (needle))

/* Loads text from a file: expects code, and a message naming FILE:LINE plus the hint. The config
   must be left untouched. */
static void expect_file_error(const char *text, int line, const char *hint, int code) {
  kdp_config c, before;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  memcpy(&before, &c, sizeof c);
  const char *path = write_ini(text);
  int rc = kdp_config_load_file(&c, path, &err);
  ck_assert_msg(rc == code, "loading \"%s\": rc %d, expected %d (msg: %s)", text, rc, code, err.msg);
  char where[4200];
  snprintf(where, sizeof where, "%s:%d:", path, line);
  assert_has(err.msg, where);
  assert_has(err.msg, hint);
  ck_assert_msg(memcmp(&c, &before, sizeof c) == 0, "failed load of \"%s\" changed the config",
                text);
}

/* kdp_config_set(arg) must fail with KDP_EINVAL, name the argument and give the hint. */
static void expect_set_error(const char *arg, const char *hint) {
  kdp_config c, before;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  memcpy(&before, &c, sizeof c);
  int rc = kdp_config_set(&c, arg, &err);
  ck_assert_msg(rc == KDP_EINVAL, "-s %s: rc %d, expected KDP_EINVAL", arg, rc);
  char prefix[512];
  snprintf(prefix, sizeof prefix, "-s %s:", arg);
  ck_assert_msg(strncmp(err.msg, prefix, strlen(prefix)) == 0, "message \"%s\" does not start %s",
                err.msg, prefix);
  assert_has(err.msg, hint);
  ck_assert_msg(memcmp(&c, &before, sizeof c) == 0, "failed -s %s changed the config", arg);
}

static void set_ok(kdp_config *c, const char *arg) {
  kdp_error err = {{0}};
  int rc = kdp_config_set(c, arg, &err);
  ck_assert_msg(rc == 0, "-s %s failed: %s", arg, err.msg);
}

/* Every "section.key" of the printed defaults (the table, seen from outside), "peer.N.arch" too. */
static int printed_keys(char names[][128], int max) {
  kdp_config c;
  kdp_config_defaults(&c);
  char *s = print_to_string(&c);
  char section[32] = "";
  int n = 0;
  for (char *line = strtok(s, "\n"); line; line = strtok(NULL, "\n")) {
    char key[32];
    if (line[0] == '[') {
      sscanf(line, "[%31[^]]]", section);
    } else if (line[0] != '#' && sscanf(line, "%31s =", key) == 1) {
      ck_assert_int_lt(n, max);
      snprintf(names[n++], 128, "%s.%s", section, key);
    }
  }
  free(s);
  snprintf(names[n++], 128, "peer.N.arch");
  snprintf(names[n++], 128, "peer.N.ranks_per_peer");
  return n;
}

/* ---- core ----------------------------------------------------------------------------------- */

START_TEST(test_defaults) {
  kdp_config a, b;
  kdp_error err = {{0}};
  memset(&a, 0xab, sizeof a); /* garbage must not survive: defaults zero the whole struct */
  memset(&b, 0x5c, sizeof b);
  kdp_config_defaults(&a);
  kdp_config_defaults(&b);
  ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "defaults are not byte-identical");
  ck_assert_msg(kdp_config_validate(&a, &err) == 0, "defaults invalid: %s", err.msg);
  ck_assert_int_eq(a.epochs, 10);
  ck_assert_int_eq(a.max_steps, 0);
  ck_assert_uint_eq(a.seed, 42);
  ck_assert_str_eq(a.dir, "runs/default");
  ck_assert_int_eq(a.log_every, 50);
  ck_assert_str_eq(a.progress, "auto");
  ck_assert_str_eq(a.format, "idx");
  ck_assert_str_eq(a.train_images,
                   "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz");
  ck_assert_str_eq(a.test_labels, "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz");
  for (int i = 0; i < 3; i++) {
    ck_assert_double_eq(a.mean[i], 0.2860);
    ck_assert_double_eq(a.std[i], 0.3530);
  }
  ck_assert_int_eq(a.augment, 0);
  ck_assert_int_eq(a.flip, 1);
  ck_assert_int_eq(a.crop_pad, 4);
  ck_assert_str_eq(a.arch, "mlp(512,256)");
  ck_assert_double_eq(a.lr, 0.05);
  ck_assert_double_eq(a.momentum, 0.9);
  ck_assert_int_eq(a.nesterov, 1);
  ck_assert_double_eq(a.weight_decay, 5e-4);
  ck_assert_int_eq(a.batch_size, 128);
  ck_assert_str_eq(a.schedule, "cosine");
  ck_assert_str_eq(a.milestones, "");
  ck_assert_str_eq(a.method, "dml");
  ck_assert_double_eq(a.temperature, 3);
  ck_assert_str_eq(a.exchange, "logits");
  ck_assert_int_eq(a.exchange_every, 50);
  ck_assert_int_eq(a.leader, -1);
  ck_assert_double_eq(a.fusion_weight_decay, 1e-5);
  for (int p = 0; p < KDP_MAX_PEERS; p++) ck_assert_str_eq(kdp_config_peer_arch(&a, p), a.arch);
}
END_TEST

START_TEST(test_load_file) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  const char *path = write_ini("# full-line comment\n"
                               "; another\n"
                               "[run]\n"
                               "epochs = 3   # inline comment\n"
                               "  seed=18446744073709551615\n"
                               "dir = /tmp/some dir/x ; inline\n"
                               "progress = plain\n"
                               "[data]\n"
                               "format = cifar10\n"
                               "augment = yes\n"
                               "flip = off\n"
                               "mean = 0.4914, 0.4822 ,0.4465\n"
                               "std = 0.25\n"
                               "subset = 5000\n"
                               "[optim]\n"
                               "lr = 1e-1\n"
                               "nesterov = 0\n"
                               "schedule = multistep\n"
                               "milestones = 150, 225\n"
                               "[kd]\n"
                               "method = okddip\n"
                               "leader = 2\n"
                               "detach = ON\n"
                               "burn_in_steps = 9000000000\n");
  int rc = kdp_config_load_file(&c, path, &err);
  ck_assert_msg(rc == 0, "load failed: %s", err.msg);
  ck_assert_int_eq(c.epochs, 3);
  ck_assert_uint_eq(c.seed, UINT64_MAX);
  ck_assert_str_eq(c.dir, "/tmp/some dir/x");
  ck_assert_str_eq(c.progress, "plain");
  ck_assert_str_eq(c.format, "cifar10");
  ck_assert_int_eq(c.augment, 1);
  ck_assert_int_eq(c.flip, 0);
  ck_assert_double_eq(c.mean[0], 0.4914);
  ck_assert_double_eq(c.mean[1], 0.4822);
  ck_assert_double_eq(c.mean[2], 0.4465);
  for (int i = 0; i < 3; i++) ck_assert_double_eq(c.std[i], 0.25);
  ck_assert_int_eq(c.subset, 5000);
  ck_assert_double_eq(c.lr, 0.1);
  ck_assert_int_eq(c.nesterov, 0);
  ck_assert_str_eq(c.milestones, "150, 225");
  ck_assert_str_eq(c.method, "okddip");
  ck_assert_int_eq(c.leader, 2);
  ck_assert_int_eq(c.detach, 1);
  ck_assert_int_eq(c.burn_in_steps, 9000000000LL);
  /* untouched keys keep their defaults */
  ck_assert_int_eq(c.batch_size, 128);
  ck_assert_str_eq(c.arch, "mlp(512,256)");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "validate: %s", err.msg);

  /* a path that needs most of KDP_PATH fits on one line */
  char big[KDP_PATH + 64], val[KDP_PATH];
  memset(val, 'p', KDP_PATH - 1);
  val[KDP_PATH - 1] = 0;
  snprintf(big, sizeof big, "[data]\ntrain_images = %s\n", val);
  rc = kdp_config_load_file(&c, write_ini(big), &err);
  ck_assert_msg(rc == 0, "long path: %s", err.msg);
  ck_assert_str_eq(c.train_images, val);
}
END_TEST

START_TEST(test_set_overrides_file) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  const char *path = write_ini("[optim]\nlr = 0.1\nbatch_size = 64\n[model]\narch = cnn\n");
  ck_assert_int_eq(kdp_config_load_file(&c, path, &err), 0);
  set_ok(&c, "optim.lr=0.2");
  set_ok(&c, " model.arch = resnet20 ");
  set_ok(&c, "data.train_images=/a=b/c"); /* '=' inside the value */
  set_ok(&c, "optim.milestones=");
  ck_assert_double_eq(c.lr, 0.2);
  ck_assert_int_eq(c.batch_size, 64);
  ck_assert_str_eq(c.arch, "resnet20");
  ck_assert_str_eq(c.train_images, "/a=b/c");
  ck_assert_str_eq(c.milestones, "");
  /* the last assignment wins */
  set_ok(&c, "optim.lr=0.3");
  ck_assert_double_eq(c.lr, 0.3);
}
END_TEST

START_TEST(test_peer_sections) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  const char *path =
      write_ini("[model]\narch = mlp(100)\n[peer.0]\narch = cnn\n[peer.63]\narch = resnet20\n");
  ck_assert_msg(kdp_config_load_file(&c, path, &err) == 0, "%s", err.msg);
  set_ok(&c, "peer.2.arch=wrn16_2");
  set_ok(&c, "peer.0.arch=seq:dense(10)"); /* overrides the file */
  ck_assert_str_eq(kdp_config_peer_arch(&c, 0), "seq:dense(10)");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 1), "mlp(100)");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 2), "wrn16_2");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 63), "resnet20");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 64), "mlp(100)");
  ck_assert_str_eq(kdp_config_peer_arch(&c, -1), "mlp(100)");
  /* the printed config keeps the non-empty peer sections and only those */
  char *s = print_to_string(&c);
  assert_has(s, "[peer.0]\narch = seq:dense(10)\n");
  assert_has(s, "[peer.2]\narch = wrn16_2\n");
  assert_has(s, "[peer.63]\narch = resnet20\n");
  ck_assert_msg(strstr(s, "[peer.1]") == NULL, "empty peer section printed:\n%s", s);
  free(s);
}
END_TEST

START_TEST(test_peer_ranks) {
  kdp_config c, back;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  /* unset: every peer takes run.ranks_per_peer */
  for (int p = 0; p < KDP_MAX_PEERS; p++) ck_assert_int_eq(kdp_config_peer_ranks(&c, p), 1);
  const char *path = write_ini("[run]\nranks_per_peer = 2\n[peer.1]\nranks_per_peer = 3\n");
  ck_assert_msg(kdp_config_load_file(&c, path, &err) == 0, "%s", err.msg);
  set_ok(&c, "peer.0.ranks_per_peer=4");
  ck_assert_int_eq(kdp_config_peer_ranks(&c, 0), 4);
  ck_assert_int_eq(kdp_config_peer_ranks(&c, 1), 3);
  ck_assert_int_eq(kdp_config_peer_ranks(&c, 2), 2);
  ck_assert_int_eq(kdp_config_peer_ranks(&c, 64), 2);
  ck_assert_int_eq(kdp_config_peer_ranks(&c, -1), 2);
  set_ok(&c, "peer.0.ranks_per_peer=0"); /* 0 = back to run.ranks_per_peer */
  ck_assert_int_eq(kdp_config_peer_ranks(&c, 0), 2);
  setenv("KDP_PEER_5_RANKS_PER_PEER", "2", 1);
  ck_assert_msg(kdp_config_apply_env(&c, &err) == 0, "%s", err.msg);
  unsetenv("KDP_PEER_5_RANKS_PER_PEER");
  ck_assert_int_eq(c.peer_ranks_per_peer[5], 2);
  /* errors name the key and the range */
  expect_set_error("peer.0.ranks_per_peer=65", "expected a value in [0, 64]");
  expect_set_error("peer.0.ranks_per_peer=-1", "expected a value in [0, 64]");
  expect_set_error("peer.0.ranks_per_peer=two", "expected an integer");
  expect_set_error("peer.0.rank_per_peer=2", "did you mean 'ranks_per_peer'?");
  /* printed: a section per peer with a key set, only the keys set; loads back identically */
  set_ok(&c, "peer.2.arch=cnn");
  char *s = print_to_string(&c);
  assert_has(s, "[peer.1]\nranks_per_peer = 3\n");
  assert_has(s, "[peer.2]\narch = cnn\n\n");
  assert_has(s, "[peer.5]\nranks_per_peer = 2\n");
  ck_assert_msg(strstr(s, "[peer.0]") == NULL, "peer section without a key set printed:\n%s", s);
  kdp_config_defaults(&back);
  ck_assert_msg(kdp_config_load_file(&back, write_ini(s), &err) == 0, "%s", err.msg);
  ck_assert_msg(memcmp(&back, &c, sizeof c) == 0, "printed per-peer keys do not load back:\n%s", s);
  free(s);
}
END_TEST

START_TEST(test_env) {
  kdp_config c, before;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  setenv("KDP_OPTIM_LR", "0.3", 1);
  setenv("KDP_RUN_DIR", "/tmp/envdir", 1);
  setenv("KDP_DATA_AUGMENT", "yes", 1);
  setenv("KDP_KD_METHOD", "ffl", 1);
  setenv("KDP_PEER_1_ARCH", "cnn", 1);
  ck_assert_msg(kdp_config_apply_env(&c, &err) == 0, "%s", err.msg);
  ck_assert_double_eq(c.lr, 0.3);
  ck_assert_str_eq(c.dir, "/tmp/envdir");
  ck_assert_int_eq(c.augment, 1);
  ck_assert_str_eq(c.method, "ffl");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 1), "cnn");
  /* -s after env wins */
  set_ok(&c, "optim.lr=0.4");
  ck_assert_double_eq(c.lr, 0.4);

  /* a bad variable: named in the error, nothing applied */
  kdp_config_defaults(&c);
  setenv("KDP_OPTIM_MOMENTUM", "abc", 1);
  memcpy(&before, &c, sizeof c);
  ck_assert_int_eq(kdp_config_apply_env(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "KDP_OPTIM_MOMENTUM");
  assert_has(err.msg, "expected a number");
  ck_assert_msg(memcmp(&c, &before, sizeof c) == 0, "failed env changed the config");
  setenv("KDP_OPTIM_MOMENTUM", "1.5", 1);
  ck_assert_int_eq(kdp_config_apply_env(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "KDP_OPTIM_MOMENTUM");
  assert_has(err.msg, "[0, 1)");
  unsetenv("KDP_OPTIM_MOMENTUM");
  setenv("KDP_PEER_7_ARCH", "", 1); /* empty = back to model.arch; fine */
  ck_assert_msg(kdp_config_apply_env(&c, &err) == 0, "%s", err.msg);
  ck_assert_str_eq(kdp_config_peer_arch(&c, 7), c.arch);
}
END_TEST

START_TEST(test_roundtrip) {
  kdp_config a, b;
  kdp_error err = {{0}};
  kdp_config_defaults(&a);
  const char *sets[] = {"run.epochs=7",
                        "run.max_steps=123456789012",
                        "run.seed=18446744073709551615",
                        "run.dir=runs/with spaces/and=equals",
                        "run.progress=none",
                        "data.format=cifar100",
                        "data.label_noise=0.30000000000000004",
                        "data.mean=0.1,0.2,0.3",
                        "data.std=1e-300",
                        "data.test_subset=17",
                        "optim.lr=0.1",
                        "optim.momentum=0.99999999999999989",
                        "optim.weight_decay=3.3333333333333335e-05",
                        "optim.schedule=multistep",
                        "optim.milestones=1.5,2,300",
                        "optim.warmup_epochs=0.25",
                        "kd.temperature=2.7182818284590451",
                        "kd.leader=-1",
                        "kd.method=codistill",
                        "kd.exchange=weights",
                        "kd.detach=true",
                        "kd.fusion_dim=65536",
                        "peer.0.arch=cnn",
                        "peer.9.arch=seq:conv(16,3,1,1),bn,relu,gap,dense(10)"};
  for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) set_ok(&a, sets[i]);
  ck_assert_msg(kdp_config_validate(&a, &err) == 0, "%s", err.msg);
  char *text = print_to_string(&a);
  kdp_config_defaults(&b);
  int rc = kdp_config_load_file(&b, write_ini(text), &err);
  ck_assert_msg(rc == 0, "reloading the printed config failed: %s\n%s", err.msg, text);
  ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "print -> load is not byte-identical:\n%s", text);
  char *text2 = print_to_string(&b);
  ck_assert_str_eq(text, text2);
  free(text);
  free(text2);

  /* the defaults round-trip too */
  kdp_config_defaults(&a);
  text = print_to_string(&a);
  memset(&b, 0, sizeof b);
  kdp_config_defaults(&b);
  set_ok(&b, "optim.lr=9");
  ck_assert_int_eq(kdp_config_load_file(&b, write_ini(text), &err), 0);
  ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "defaults do not round-trip");
  free(text);
}
END_TEST

START_TEST(test_milestones) {
  kdp_config c;
  kdp_error err = {{0}};
  double m[4];
  kdp_config_defaults(&c);
  ck_assert_int_eq(kdp_config_milestones(&c, m, 4, &err), 0);
  set_ok(&c, "optim.milestones= 150 , 225");
  ck_assert_int_eq(kdp_config_milestones(&c, m, 4, &err), 2);
  ck_assert_double_eq(m[0], 150);
  ck_assert_double_eq(m[1], 225);
  set_ok(&c, "optim.milestones=0.5,1,2.5,4");
  ck_assert_int_eq(kdp_config_milestones(&c, m, 4, &err), 4);
  ck_assert_double_eq(m[2], 2.5);
  ck_assert_int_eq(kdp_config_milestones(&c, m, 3, &err), KDP_EINVAL);
  assert_has(err.msg, "more than 3");
  /* a struct filled in by hand is checked as well */
  strcpy(c.milestones, "5,5");
  ck_assert_int_eq(kdp_config_milestones(&c, m, 4, &err), KDP_EINVAL);
  assert_has(err.msg, "increasing");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "optim.milestones");
}
END_TEST

START_TEST(test_validate) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  set_ok(&c, "optim.schedule=multistep");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "milestones");
  set_ok(&c, "optim.milestones=30,60");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
  c.leader = 64;
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "kd.leader");
  kdp_config_defaults(&c);
  c.lr = 20;
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "optim.lr");
  assert_has(err.msg, "[0, 10]");
  kdp_config_defaults(&c);
  strcpy(c.method, "dmx");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "kd.method");
  kdp_config_defaults(&c);
  c.arch[0] = 0;
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "model.arch");
  /* kdcl general fits its weights on the validation split: refused without one */
  kdp_config_defaults(&c);
  set_ok(&c, "kd.method=kdcl");
  set_ok(&c, "kd.ensemble=general");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "data.val_size");
  set_ok(&c, "data.val_size=500");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
  set_ok(&c, "data.val_size=0");
  set_ok(&c, "kd.ensemble=minlogit");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
}
END_TEST

START_TEST(test_unknown_key_suggestion) {
  expect_set_error("optim.lrr=0.1", "did you mean 'lr'?");
  expect_set_error("optim.weightdecay=0.1", "did you mean 'weight_decay'?");
  expect_set_error("kd.temprature=2", "did you mean 'temperature'?");
  expect_set_error("optim.temperature=2", "is a key of [kd]");
  expect_set_error("lr=0.1", "did you mean optim.lr?");
  /* far from everything: no suggestion, but the list of keys */
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  ck_assert_int_eq(kdp_config_set(&c, "optim.zzzzzz=1", &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "did you mean") == NULL, "spurious suggestion: %s", err.msg);
  assert_has(err.msg, "lr, momentum, nesterov");
}
END_TEST

START_TEST(test_reference_files) {
  kdp_config d, c;
  kdp_error err = {{0}};
  kdp_config_defaults(&d);
  /* configs/default.ini loads to exactly the built-in defaults and is the generated text */
  const char *ini = kdp_test_src_path("configs/default.ini");
  kdp_config_defaults(&c);
  set_ok(&c, "optim.lr=1");
  ck_assert_msg(kdp_config_load_file(&c, ini, &err) == 0, "%s", err.msg);
  ck_assert_msg(memcmp(&c, &d, sizeof c) == 0, "configs/default.ini differs from the defaults");
  char *file = read_whole(ini);
  char *gen = keys_to_string(KDP_KEYS_INI);
  ck_assert_msg(strcmp(file, gen) == 0,
                "configs/default.ini is stale: regenerate with kdp_config_print_keys_fmt(f, "
                "KDP_KEYS_INI)");
  free(file);
  free(gen);
  /* docs/config.md contains the generated table */
  file = read_whole(kdp_test_src_path("docs/config.md"));
  gen = keys_to_string(KDP_KEYS_MARKDOWN);
  ck_assert_msg(strstr(file, gen) != NULL,
                "docs/config.md is stale: regenerate the table with kdp_config_print_keys_fmt(f, "
                "KDP_KEYS_MARKDOWN)");
  free(file);
  free(gen);
  /* every key appears in the help text, the INI file and the docs, with its env var */
  static char names[128][128];
  int n = printed_keys(names, 120);
  ck_assert_int_ge(n, 45);
  char *help = keys_to_string(KDP_KEYS_TEXT);
  char *md = keys_to_string(KDP_KEYS_MARKDOWN);
  for (int i = 0; i < n; i++) {
    assert_has(help, names[i]);
    char *dot = strrchr(names[i], '.');
    char key[160];
    snprintf(key, sizeof key, "`%.120s`", dot + 1);
    assert_has(md, key);
    if (strncmp(names[i], "peer.N.", 7) == 0) continue;
    char env[160];
    snprintf(env, sizeof env, "KDP_%.120s", names[i]);
    for (char *p = env; *p; p++) *p = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
    assert_has(help, env);
    assert_has(md, env);
  }
  free(help);
  free(md);
}
END_TEST

START_TEST(test_listen_and_token) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  /* an address with a port is refused when set, and told where the port goes */
  expect_set_error("server.listen=127.0.0.1:0", "the port is server.port");
  expect_set_error("server.listen=127.0.0.1:8470", "-s server.listen=127.0.0.1 -s server.port=8470");
  expect_set_error("server.listen=[::1]:80", "the port is server.port");
  expect_set_error("server.listen=myhost", "not a numeric IPv4/IPv6 address");
  expect_file_error("[server]\nlisten = 10.0.0.1:99\n", 2, "the port is server.port", KDP_EINVAL);
  set_ok(&c, "server.listen=::1");
  set_ok(&c, "server.listen=[::1]");
  set_ok(&c, "server.listen=localhost");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
  /* every interface without a token: refused at validation, with the way out */
  set_ok(&c, "server.listen=0.0.0.0");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "server.token");
  assert_has(err.msg, "0.0.0.0");
  set_ok(&c, "server.listen=::");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  set_ok(&c, "server.token=s3cret");
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
  set_ok(&c, "server.token=");
  set_ok(&c, "server.enabled=false"); /* no server, nothing to protect */
  ck_assert_msg(kdp_config_validate(&c, &err) == 0, "%s", err.msg);
}
END_TEST

START_TEST(test_env_unknown_names) {
  kdp_config c, before;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  memcpy(&before, &c, sizeof c);
  /* a misspelt key is an error that suggests the key, and nothing is applied */
  setenv("KDP_RUN_EPOCH", "2", 1);
  setenv("KDP_OPTIM_LR", "0.3", 1);
  ck_assert_int_eq(kdp_config_apply_env(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "KDP_RUN_EPOCH names no config key");
  assert_has(err.msg, "did you mean KDP_RUN_EPOCHS, the key run.epochs?");
  ck_assert_msg(memcmp(&c, &before, sizeof c) == 0, "a refused environment changed the config");
  unsetenv("KDP_RUN_EPOCH");
  setenv("KDP_WHATEVER", "1", 1);
  ck_assert_int_eq(kdp_config_apply_env(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "KDP_WHATEVER names no config key");
  ck_assert_msg(strstr(err.msg, "did you mean") == NULL, "spurious suggestion: %s", err.msg);
  unsetenv("KDP_WHATEVER");
  setenv("KDP_PEER_3_ARCHH", "cnn", 1);
  ck_assert_int_eq(kdp_config_apply_env(&c, &err), KDP_EINVAL);
  unsetenv("KDP_PEER_3_ARCHH");
  /* kdpeers' own non-config variables are fine, and so are the keys' */
  char *saved[64] = {0};
  int no = 0;
  for (const char *const *o = kdp_config_other_env; *o; o++, no++) {
    ck_assert_int_lt(no, 64);
    if (getenv(*o)) saved[no] = strdup(getenv(*o));
    if (!saved[no]) setenv(*o, "x", 1);
  }
  setenv("KDP_PEER_3_ARCH", "cnn", 1);
  ck_assert_msg(kdp_config_apply_env(&c, &err) == 0, "%s", err.msg);
  ck_assert_double_eq(c.lr, 0.3);
  for (int i = 0; i < no; i++) {
    if (saved[i]) free(saved[i]);
    else unsetenv(kdp_config_other_env[i]);
  }
  unsetenv("KDP_PEER_3_ARCH");
  unsetenv("KDP_OPTIM_LR");
  /* the list documents every variable the scripts use */
  char *doc = read_whole(kdp_test_src_path("docs/config.md"));
  for (const char *const *o = kdp_config_other_env; *o; o++) {
    char want[80];
    snprintf(want, sizeof want, "`%s`", *o);
    assert_has(doc, want);
  }
  free(doc);
}
END_TEST

START_TEST(test_sections_and_bytes) {
  /* the known-sections message names every section of the table */
  expect_set_error("optm.lr=0.1", "[kd], [checkpoint], [server], [peer.N]");
  expect_file_error("lr = 1\n", 1, "[checkpoint], [server], [peer.N]", KDP_EINVAL);
  uint64_t v = 0;
  char why[256];
  ck_assert_int_eq(kdp_config_parse_bytes("16G", &v, why, sizeof why), 0);
  ck_assert_uint_eq(v, 16ull << 30);
  ck_assert_int_eq(kdp_config_parse_bytes("512MiB", &v, why, sizeof why), 0);
  ck_assert_uint_eq(v, 512ull << 20);
  ck_assert_int_eq(kdp_config_parse_bytes("1.5k", &v, why, sizeof why), 0);
  ck_assert_uint_eq(v, 1536);
  ck_assert_int_eq(kdp_config_parse_bytes("1000", &v, why, sizeof why), 0);
  ck_assert_uint_eq(v, 1000);
  ck_assert_int_eq(kdp_config_parse_bytes("16X", &v, why, sizeof why), KDP_EINVAL);
  ck_assert_int_eq(kdp_config_parse_bytes("-1G", &v, why, sizeof why), KDP_EINVAL);
  expect_set_error("run.max_memory=lots", "suffix K, M, G or T");
  kdp_config c;
  kdp_config_defaults(&c);
  ck_assert_uint_eq(kdp_config_max_memory(&c), 0);
  set_ok(&c, "run.max_memory=2G");
  ck_assert_uint_eq(kdp_config_max_memory(&c), 2ull << 30);
}
END_TEST

/* ---- limits --------------------------------------------------------------------------------- */

START_TEST(test_file_errors) {
  expect_file_error("[optm]\nlr = 1\n", 2, "Known sections: [run], [data]", KDP_EINVAL);
  expect_file_error("[optm]\nlr = 1\n", 2, "did you mean [optim]?", KDP_EINVAL);
  expect_file_error("[run]\nepochs = 1\n[optim]\nlrr = 1\n", 4, "did you mean 'lr'?",
                    KDP_EINVAL);
  expect_file_error("[optim]\nfoo = 1\n", 2, "Keys in [optim]: lr, momentum", KDP_EINVAL);
  expect_file_error("[optim]\n\nlr = abc\n", 3, "optim.lr = 'abc': expected a number",
                    KDP_EINVAL);
  expect_file_error("[run]\nepochs = 5x\n", 2, "expected an integer, found trailing characters 'x'",
                    KDP_EINVAL);
  expect_file_error("[optim]\nlr = 0.1.2\n", 2, "trailing characters '.2'", KDP_EINVAL);
  expect_file_error("[optim]\nlr = nan\n", 2, "finite", KDP_EINVAL);
  expect_file_error("[optim]\nlr = 1e999\n", 2, "finite", KDP_EINVAL);
  expect_file_error("[run]\nepochs = 0\n", 2, "out of range: expected a value in [1, 100000]",
                    KDP_EINVAL);
  expect_file_error("[optim]\nmomentum = 1\n", 2, "[0, 1)", KDP_EINVAL);
  expect_file_error("[optim]\ngamma = 0\n", 2, "(0, 1]", KDP_EINVAL);
  expect_file_error("[kd]\ntemperature = 0\n", 2, "(0, 100]", KDP_EINVAL);
  expect_file_error("[kd]\nleader = -2\n", 2, "[-1, 63]", KDP_EINVAL);
  expect_file_error("[data]\nstd = 0.5, 0, 1\n", 2, "> 0", KDP_EINVAL);
  expect_file_error("[data]\nmean = 0.5, 0.4\n", 2, "expected 1 or 3 comma-separated numbers",
                    KDP_EINVAL);
  expect_file_error("[data]\nmean = 1,2,3,4\n", 2, "expected 1 or 3", KDP_EINVAL);
  expect_file_error("[run]\nmax_steps = 99999999999999999999\n", 2, "integer overflow",
                    KDP_EINVAL);
  expect_file_error("[run]\nepochs = 3000000000\n", 2, "[1, 100000]", KDP_EINVAL);
  expect_file_error("[kd]\nexchange_every = 3000000000\n", 2, ">= 1", KDP_EINVAL);
  expect_file_error("[run]\nseed = -1\n", 2, "expected a non-negative integer", KDP_EINVAL);
  expect_file_error("[run]\nseed = 18446744073709551616\n", 2, "integer overflow", KDP_EINVAL);
  expect_file_error("[kd]\nmethod = dmll\n", 2,
                    "expected one of: independent, dml, codistill, avg, one, ffl, okddip",
                    KDP_EINVAL);
  expect_file_error("[run]\nprogress = fancy\n", 2, "auto, bar, plain, none", KDP_EINVAL);
  expect_file_error("[run]\nema_decay = 1\n", 2, "[0, 1)", KDP_EINVAL);
  expect_file_error("[data]\naugment = maybe\n", 2, "true/false, 1/0, yes/no or on/off",
                    KDP_EINVAL);
  expect_file_error("[optim]\nmilestones = 150,100\n", 2, "increasing positive numbers",
                    KDP_EINVAL);
  expect_file_error("[optim]\nmilestones = 0,100\n", 2, "not positive", KDP_EINVAL);
  expect_file_error("[optim]\nmilestones = 10,,20\n", 2, "increasing positive numbers",
                    KDP_EINVAL);
  expect_file_error("[peer.64]\narch = cnn\n", 2, "out of range: expected 0..63", KDP_EINVAL);
  expect_file_error("[peer.x]\narch = cnn\n", 2, "expected [peer.N]", KDP_EINVAL);
  expect_file_error("[peer.1]\narc = cnn\n", 2, "did you mean 'arch'?", KDP_EINVAL);
  expect_file_error("lr = 1\n", 1, "before any [section]", KDP_EINVAL);
  expect_file_error("[run]\nepochs = 2\nthis is not ini\n", 3, "expected '[section]'",
                    KDP_EINVAL);
  expect_file_error("[run\nepochs = 2\n", 1, "expected '[section]'", KDP_EINVAL);
  /* the first error wins, later lines are not reported */
  expect_file_error("[run]\nepochs = x\nseed = y\n", 2, "expected an integer", KDP_EINVAL);

  /* strings longer than the field are refused, never truncated */
  char text[600];
  snprintf(text, sizeof text, "[model]\narch = %0300d\n", 7);
  expect_file_error(text, 2, "too long: 300 characters, at most 255 allowed", KDP_EINVAL);
  char *huge = malloc(6000);
  strcpy(huge, "[data]\ntrain_images = ");
  size_t l = strlen(huge);
  memset(huge + l, 'q', 5000);
  strcpy(huge + l + 5000, "\n");
  expect_file_error(huge, 2, "line too long", KDP_EINVAL);
  memset(huge + l, 'q', 2000); /* fits the line, not the field */
  strcpy(huge + l + 2000, "\n");
  expect_file_error(huge, 2, "at most 1023 allowed", KDP_EINVAL);
  free(huge);
}
END_TEST

START_TEST(test_missing_file) {
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  char path[4200];
  snprintf(path, sizeof path, "%s/does-not-exist.ini", tmpdir_path);
  ck_assert_int_eq(kdp_config_load_file(&c, path, &err), KDP_EIO);
  assert_has(err.msg, path);
  assert_has(err.msg, "No such file or directory");
  ck_assert_int_eq(kdp_config_load_file(&c, tmpdir_path, &err), KDP_EIO); /* a directory */
  assert_has(err.msg, tmpdir_path);
  ck_assert_int_eq(kdp_config_load_file(&c, NULL, &err), KDP_EINVAL);
  ck_assert_int_eq(kdp_config_set(&c, NULL, &err), KDP_EINVAL);
}
END_TEST

/* kdp_config_validate of the defaults with kd.method = method and, when frozen, a frozen peer 1 */
static int validate_method(const char *method, int frozen, kdp_error *err) {
  kdp_config c;
  kdp_config_defaults(&c);
  char a[64];
  snprintf(a, sizeof a, "kd.method=%s", method);
  set_ok(&c, a);
  if (frozen) set_ok(&c, "peer.1.teacher=t.kdpm");
  return kdp_config_validate(&c, err);
}

/* a frozen peer (peer.N.teacher) only with methods whose peers take part through their logits */
START_TEST(test_frozen_teacher_methods) {
  const char *ok[] = {"independent", "dml", "codistill", "avg", "kdcl", "switokd"};
  const char *refused[] = {"one", "ffl", "okddip", "pcl", "mcl"};
  kdp_error err = {{0}};
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
    ck_assert_msg(validate_method(ok[i], 1, &err) == 0, "%s: %s", ok[i], err.msg);
  for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
    ck_assert_int_eq(validate_method(refused[i], 0, &err), 0); /* without a frozen peer: fine */
    ck_assert_int_eq(validate_method(refused[i], 1, &err), KDP_EINVAL);
    assert_has(err.msg, "peer.1.teacher");
    assert_has(err.msg, "methods that accept one: independent, dml, codistill, avg, kdcl, switokd");
  }
  kdp_config c;
  kdp_config_defaults(&c);
  set_ok(&c, "kd.method=codistill");
  set_ok(&c, "kd.exchange=weights");
  set_ok(&c, "peer.0.teacher=t.kdpm");
  ck_assert_int_eq(kdp_config_validate(&c, &err), KDP_EINVAL);
  assert_has(err.msg, "kd.exchange = logits");
  ck_assert_int_eq(c.teacher_peer, 0); /* kd.teacher_peer's default */
  expect_set_error("kd.teacher_peer=64", "[0, 63]");
}
END_TEST

START_TEST(test_set_errors) {
  expect_set_error("optim.lr", "missing '='");
  expect_set_error("optim.lr", "expected section.key=value");
  expect_set_error("optim.lr=abc", "expected a number");
  expect_set_error("optim.lr=", "expected a number");
  expect_set_error("optim.lr=0.1x", "trailing characters 'x'");
  expect_set_error("optim.lr=11", "[0, 10]");
  expect_set_error("run.epochs=1.5", "expected an integer");
  expect_set_error("optim.batch_size=99999999999999999999999", "integer overflow");
  expect_set_error("kd.method=DML2", "expected one of:");
  expect_set_error("optim.nesterov=2", "true/false");
  expect_set_error("optim.milestones=100,50", "increasing positive numbers");
  expect_set_error("optm.lr=0.1", "Known sections");
  expect_set_error("optim.foo=1", "Keys in [optim]");
  expect_set_error("peer.64.arch=cnn", "out of range: expected 0..63");
  expect_set_error("peer.-1.arch=cnn", "expected [peer.N]");
  expect_set_error("peer.arch=cnn", "needs a peer index");
  expect_set_error("=1", "expected section.key=value");
  expect_set_error(".lr=1", "expected section.key=value");
  expect_set_error("optim.=1", "expected section.key=value");
  char arg[400];
  snprintf(arg, sizeof arg, "peer.3.arch=%0256d", 1);
  kdp_config c;
  kdp_error err = {{0}};
  kdp_config_defaults(&c);
  ck_assert_int_eq(kdp_config_set(&c, arg, &err), KDP_EINVAL);
  assert_has(err.msg, "at most 255");
  ck_assert_str_eq(kdp_config_peer_arch(&c, 3), c.arch);
}
END_TEST

static Suite *config_suite(void) {
  Suite *s = suite_create("config");
  TCase *core = kdp_test_case("core");
  tcase_add_checked_fixture(core, setup, teardown);
  tcase_add_test(core, test_defaults);
  tcase_add_test(core, test_load_file);
  tcase_add_test(core, test_set_overrides_file);
  tcase_add_test(core, test_peer_sections);
  tcase_add_test(core, test_peer_ranks);
  tcase_add_test(core, test_env);
  tcase_add_test(core, test_roundtrip);
  tcase_add_test(core, test_milestones);
  tcase_add_test(core, test_validate);
  tcase_add_test(core, test_unknown_key_suggestion);
  tcase_add_test(core, test_reference_files);
  suite_add_tcase(s, core);
  TCase *limits = kdp_test_case("limits");
  tcase_add_checked_fixture(limits, setup, teardown);
  tcase_add_test(limits, test_file_errors);
  tcase_add_test(limits, test_missing_file);
  tcase_add_test(limits, test_set_errors);
  tcase_add_test(limits, test_frozen_teacher_methods);
  tcase_add_test(limits, test_listen_and_token);
  tcase_add_test(limits, test_env_unknown_names);
  tcase_add_test(limits, test_sections_and_bytes);
  suite_add_tcase(s, limits);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(config_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
