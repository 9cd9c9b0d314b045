/* main.c: the command line: parses options, builds the config, starts MPI and runs the job. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/config.h"
#include "kdpeers/data.h"
#include "kdpeers/dist.h"
#include "kdpeers/nn.h"
#include "kdpeers/train.h"

#define EXIT_USAGE 2

static void usage(FILE *f) {
  fprintf(f,
          "usage: kdpeers [-c FILE.ini] [-s section.key=value]... [options]\n"
          "       mpirun -np P kdpeers [...]      P peers learn from each other\n"
          "\n"
          "With no arguments, runs the built-in job: online distillation on Fashion-MNIST\n"
          "(a single process trains one peer as the 'independent' baseline).\n"
          "\n"
          "options:\n"
          "  -c, --config FILE     read an INI config (later files and -s override earlier)\n"
          "  -s, --set S.K=V       override one key, e.g. -s optim.lr=0.1 -s peer.2.arch=cnn\n"
          "      --print-config    print the effective config as INI and exit\n"
          "      --print-model     print the model of every peer and exit\n"
          "      --fresh           start over: delete run.dir/checkpoints, truncate metrics.jsonl\n"
          "      --allow-config-change  resume although settings such as optim.lr changed\n"
          "                        (each change is logged); model, method and layout cannot\n"
          "  -h, --help            this help, with every config key\n"
          "  -V, --version         print the version\n"
          "\n"
          "Environment: KDP_<SECTION>_<KEY> sets a key (the command line wins).\n"
          "Exit status: 0 done, 1 run failed, 2 bad usage or config.\n"
          "\n");
}

typedef struct cli {
  const char *files[32];
  int n_files;
  const char *sets[256];
  int n_sets;
  int print_config, print_model, help, version;
  kdp_run_opts opts;
} cli;

static int parse_cli(int argc, char **argv, cli *c) {
  memset(c, 0, sizeof *c);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0 || strcmp(a, "-s") == 0 ||
        strcmp(a, "--set") == 0) {
      if (i + 1 >= argc) {
        fprintf(stderr, "kdpeers: %s needs an argument (see --help)\n", a);
        return -1;
      }
      if (a[1] == 'c' || a[2] == 'c') {
        if (c->n_files >= 32) {
          fprintf(stderr, "kdpeers: too many -c files (max 32)\n");
          return -1;
        }
        c->files[c->n_files++] = argv[++i];
      } else {
        if (c->n_sets >= 256) {
          fprintf(stderr, "kdpeers: too many -s overrides (max 256)\n");
          return -1;
        }
        c->sets[c->n_sets++] = argv[++i];
      }
    } else if (strncmp(a, "--set=", 6) == 0 && c->n_sets < 256) {
      c->sets[c->n_sets++] = a + 6;
    } else if (strncmp(a, "--config=", 9) == 0 && c->n_files < 32) {
      c->files[c->n_files++] = a + 9;
    } else if (strcmp(a, "--print-config") == 0) {
      c->print_config = 1;
    } else if (strcmp(a, "--fresh") == 0) {
      c->opts.fresh = 1;
    } else if (strcmp(a, "--allow-config-change") == 0) {
      c->opts.allow_change = 1;
    } else if (strcmp(a, "--print-model") == 0) {
      c->print_model = 1;
    } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      c->help = 1;
    } else if (strcmp(a, "-V") == 0 || strcmp(a, "--version") == 0) {
      c->version = 1;
    } else {
      fprintf(stderr, "kdpeers: unknown argument '%s' (see --help)\n", a);
      return -1;
    }
  }
  return 0;
}

/* defaults, then files in order, then KDP_* environment, then -s (the command line wins) */
static int build_config(const cli *c, kdp_config *cfg, kdp_error *err) {
  kdp_config_defaults(cfg);
  int rc;
  for (int i = 0; i < c->n_files; i++)
    if ((rc = kdp_config_load_file(cfg, c->files[i], err)) != 0) return rc;
  if ((rc = kdp_config_apply_env(cfg, err)) != 0) return rc;
  for (int i = 0; i < c->n_sets; i++)
    if ((rc = kdp_config_set(cfg, c->sets[i], err)) != 0) return rc;
  return kdp_config_validate(cfg, err);
}

static int print_models(const kdp_config *cfg, int n_peers, kdp_error *err) {
  kdp_dataset tr, te;
  int rc = kdp_train_load_data(cfg, &tr, &te, err);
  if (rc != 0) return rc;
  kdp_input_shape in = {tr.H, tr.W, tr.C, tr.n_classes};
  for (int p = 0; p < n_peers && rc == 0; p++) {
    kdp_model *m = NULL;
    rc = kdp_model_create(&m, kdp_config_peer_arch(cfg, p), in, (size_t)cfg->batch_size, err);
    if (rc == 0) {
      printf("peer %d: ", p);
      kdp_model_describe(m, stdout);
      kdp_model_free(m);
    }
  }
  kdp_dataset_free(&tr);
  kdp_dataset_free(&te);
  return rc;
}

int main(int argc, char **argv) {
  cli c;
  if (parse_cli(argc, argv, &c) != 0) return EXIT_USAGE;
  if (c.help) {
    usage(stdout);
    kdp_config_print_keys(stdout);
    return 0;
  }
  if (c.version) {
    printf("kdpeers %s\n", KDP_VERSION);
    return 0;
  }
  kdp_config cfg;
  kdp_error err = {{0}};
  if (c.print_config) {
    if (build_config(&c, &cfg, &err) != 0) {
      fprintf(stderr, "kdpeers: %s\n", err.msg);
      return EXIT_USAGE;
    }
    kdp_config_print(&cfg, stdout);
    return 0;
  }
  if (kdp_dist_init_mpi(&argc, &argv, &err) != 0) {
    fprintf(stderr, "kdpeers: %s\n", err.msg);
    return 1;
  }
  int rank = kdp_dist_world_rank();
  if (build_config(&c, &cfg, &err) != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
    kdp_dist_finalize();
    return EXIT_USAGE;
  }
  kdp_dist d;
  if (kdp_dist_setup(&d, cfg.ranks_per_peer, &err) != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
    kdp_dist_finalize();
    return EXIT_USAGE;
  }
  int rc;
  if (c.print_model) {
    rc = rank == 0 ? print_models(&cfg, d.n_peers, &err) : 0;
  } else {
    kdp_train_install_signals();
    rc = kdp_train_run(&cfg, &d, &c.opts, &err);
  }
  if (rc != 0 && rc != KDP_ESTOPPED) fprintf(stderr, "kdpeers: rank %d: %s\n", d.world_rank, err.msg);
  kdp_dist_free(&d);
  kdp_dist_finalize();
  if (rc == KDP_ESTOPPED) return KDP_EXIT_PREEMPTED;
  if (rc == KDP_EINVAL) return EXIT_USAGE;
  return rc == 0 ? 0 : 1;
}
