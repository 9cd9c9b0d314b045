/* main.c: the command line: parses options, builds the config, starts MPI and runs the job. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/config.h"
#include "kdpeers/data.h"
#include "kdpeers/dist.h"
#include "kdpeers/nn.h"
#include "kdpeers/tools.h"
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
          "commands:\n"
          "  kdpeers inspect FILE|RUN_DIR          what a checkpoint or model file holds\n"
          "  kdpeers export RUN_DIR --peer N -o F  a standalone student model file (.kdpm)\n"
          "  kdpeers eval MODEL|RUN_DIR [-s ...]   test accuracy (of every peer and the ensemble)\n"
          "  [mpirun -np N] kdpeers serve RUN_DIR  serve /predict from a saved run, no training\n"
          "  kdpeers plot RUN_DIR [-o F.svg]       learning curves (every run writes curves.svg)\n"
          "  kdpeers predict MODEL [IMAGES|-] [--top]  labels and probabilities; IMAGES is an IDX\n"
          "                                        file, '-' reads raw uint8 pixels from stdin\n"
          "\n"
          "Environment: KDP_<SECTION>_<KEY> sets a key (the command line wins).\n"
          "Exit status: 0 done, 1 run failed, 2 bad usage or config, 75 stopped by a signal\n"
          "after a checkpoint (rerun to resume), 143 a second signal.\n"
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

/* kdpeers COMMAND ...: the artefact tools (no MPI) */
static int run_tool(int argc, char **argv) {
  const char *cmd = argv[1];
  if (strcmp(cmd, "inspect") == 0) {
    if (argc != 3) {
      fprintf(stderr, "usage: kdpeers inspect FILE|RUN_DIR\n");
      return EXIT_USAGE;
    }
    return kdp_tool_inspect(argv[2]);
  }
  if (strcmp(cmd, "export") == 0) {
    const char *run = NULL, *out = NULL;
    long peer = 0;
    for (int i = 2; i < argc; i++) {
      if (strcmp(argv[i], "--peer") == 0 && i + 1 < argc) {
        char *end;
        peer = strtol(argv[++i], &end, 10);
        if (*end || peer < 0 || peer >= KDP_MAX_PEERS) {
          fprintf(stderr, "kdpeers export: --peer takes a peer index 0..%d\n", KDP_MAX_PEERS - 1);
          return EXIT_USAGE;
        }
      } else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) {
        out = argv[++i];
      } else if (!run && argv[i][0] != '-') {
        run = argv[i];
      } else {
        fprintf(stderr, "kdpeers export: unexpected '%s'\n", argv[i]);
        return EXIT_USAGE;
      }
    }
    if (!run || !out) {
      fprintf(stderr, "usage: kdpeers export RUN_DIR --peer N -o student.kdpm\n");
      return EXIT_USAGE;
    }
    return kdp_tool_export(run, (int)peer, out);
  }
  if (strcmp(cmd, "eval") == 0) {
    if (argc < 3 || argv[2][0] == '-') {
      fprintf(stderr, "usage: kdpeers eval MODEL|RUN_DIR [-c FILE] [-s data.test_images=...]\n");
      return EXIT_USAGE;
    }
    cli c;
    const char *path = argv[2];
    /* the options after the path parse like the trainer's (argv[2] stands in for argv[0]) */
    if (parse_cli(argc - 2, argv + 2, &c) != 0) return EXIT_USAGE;
    kdp_config cfg;
    kdp_error err;
    if (build_config(&c, &cfg, &err) != 0) {
      fprintf(stderr, "kdpeers eval: %s\n", err.msg);
      return EXIT_USAGE;
    }
    return kdp_tool_eval(path, &cfg);
  }
  if (strcmp(cmd, "plot") == 0) {
    if (argc != 3 && !(argc == 5 && strcmp(argv[3], "-o") == 0)) {
      fprintf(stderr, "usage: kdpeers plot RUN_DIR [-o curves.svg]\n");
      return EXIT_USAGE;
    }
    char out[4200], why[512];
    if (argc == 5)
      snprintf(out, sizeof out, "%s", argv[4]);
    else
      snprintf(out, sizeof out, "%s/curves.svg", argv[2]);
    if (kdp_plot_run(argv[2], out, why, sizeof why) != 0) {
      fprintf(stderr, "kdpeers plot: %s\n", why);
      return 1;
    }
    printf("%s\n", out);
    return 0;
  }
  if (strcmp(cmd, "predict") == 0) {
    const char *model = NULL, *input = NULL;
    int top = 0;
    for (int i = 2; i < argc; i++) {
      if (strcmp(argv[i], "--top") == 0)
        top = 1;
      else if (!model)
        model = argv[i];
      else if (!input)
        input = argv[i];
      else {
        fprintf(stderr, "kdpeers predict: unexpected '%s'\n", argv[i]);
        return EXIT_USAGE;
      }
    }
    if (!model) {
      fprintf(stderr, "usage: kdpeers predict MODEL [IMAGES.idx[.gz]|-] [--top]\n");
      return EXIT_USAGE;
    }
    return kdp_tool_predict(model, input ? input : "-", top);
  }
  return -1;
}

/* kdpeers serve RUN_DIR [-c FILE] [-s ...]: the run's newest checkpoint answers /predict, alone or
   under mpirun with the run's rank count (then with the method's teacher too). */
static int serve_main(int argc, char **argv) {
  if (argc < 3 || argv[2][0] == '-') {
    fprintf(stderr, "usage: [mpirun -np N] kdpeers serve RUN_DIR [-s server.port=8470] [...]\n");
    return EXIT_USAGE;
  }
  const char *run_dir = argv[2];
  cli c;
  if (parse_cli(argc - 2, argv + 2, &c) != 0) return EXIT_USAGE;
  kdp_error err = {{0}};
  if (kdp_dist_init_mpi(&argc, &argv, &err) != 0) {
    fprintf(stderr, "kdpeers: %s\n", err.msg);
    return 1;
  }
  int rank = kdp_dist_world_rank();
  char saved[256] = "";
  int n_ranks = 0, rc = kdp_tool_saved_config(run_dir, saved, sizeof saved, &n_ranks, &err);
  kdp_config cfg;
  if (rc == 0) {
    /* the run's own settings, then the command line's (server.* in particular) */
    cli base = c;
    base.files[0] = saved;
    for (int i = 0; i < c.n_files && i + 1 < 32; i++) base.files[i + 1] = c.files[i];
    base.n_files = c.n_files + 1;
    rc = build_config(&base, &cfg, &err);
    if (rc == 0) {
      snprintf(cfg.dir, sizeof cfg.dir, "%s", run_dir);
      cfg.server_enabled = 1;
    }
  }
  if (saved[0]) unlink(saved);
  if (rc != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    kdp_dist_finalize();
    return rc == KDP_EINVAL ? EXIT_USAGE : 1;
  }
  kdp_dist d;
  int world = 1;
  int sr = n_ranks > 1 ? kdp_dist_setup_layout(&d, cfg.ranks_per_peer, cfg.peer_ranks_per_peer,
                                               KDP_MAX_PEERS, &err)
                       : kdp_dist_setup(&d, 1, &err);
  if (sr == 0) world = d.world_size;
  if (world == 1 && n_ranks != 1) {
    rc = kdp_tool_serve_alone(run_dir, &cfg);
  } else if (world != n_ranks) {
    if (rank == 0)
      fprintf(stderr,
              "kdpeers serve: %s was trained on %d ranks; serve it alone (1 process) or under "
              "mpirun -np %d\n",
              run_dir, n_ranks, n_ranks);
    rc = EXIT_USAGE;
  } else {
    kdp_run_opts o = {.serve_only = 1};
    kdp_train_install_signals();
    rc = kdp_train_run(&cfg, &d, &o, &err);
    if (rc != 0 && rc != KDP_ESTOPPED) fprintf(stderr, "kdpeers serve: rank %d: %s\n", rank, err.msg);
    rc = (rc == 0 || rc == KDP_ESTOPPED) ? 0 : 1;
  }
  kdp_dist_free(&d);
  kdp_dist_finalize();
  return rc;
}

int main(int argc, char **argv) {
  /* A client that closes its connection early must never end the run: socket writes fail with
     EPIPE instead (the server's thread blocks SIGPIPE as well, for library use). A write to a
     closed stdout pipe fails the same way: kdpeers predict stops on it. */
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 2 && strcmp(argv[1], "serve") == 0) return serve_main(argc, argv);
  if (argc >= 2 && argv[1][0] != '-') {
    int rc = run_tool(argc, argv);
    if (rc >= 0) return rc;
    fprintf(stderr, "kdpeers: unknown command '%s' (see --help)\n", argv[1]);
    return EXIT_USAGE;
  }
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
  if (kdp_dist_setup_layout(&d, cfg.ranks_per_peer, cfg.peer_ranks_per_peer, KDP_MAX_PEERS,
                            &err) != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
    kdp_dist_finalize();
    return EXIT_USAGE;
  }
  /* the silent singleton: srun without the right --mpi starts N independent 1-rank jobs */
  const char *ntasks = getenv("SLURM_NTASKS");
  if (ntasks && atoi(ntasks) > 1 && d.world_size == 1) {
    fprintf(stderr,
            "kdpeers: SLURM_NTASKS=%s but MPI reports a world of 1 rank: every task believes it is "
            "rank 0 of 1. kdpeers was started inside an allocation without a launcher, or by srun "
            "without a working MPI plugin: launch with `srun --mpi=pmix` (see `srun --mpi=list`) or "
            "mpirun, e.g. with launch/kdpeers.sbatch or launch/kdpeers-mpirun.sbatch\n",
            ntasks);
    kdp_dist_free(&d);
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
