/* main.c: the command line: parses options, builds the config, starts MPI and runs the job. */
#include <cblas.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdpeers/config.h"
#include "kdpeers/data.h"
#include "kdpeers/dist.h"
#include "kdpeers/infer.h"
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
          "      --resume-as P     resume the newest checkpoint with a cohort of P peers\n"
          "                        (auto: the cohort that fits the ranks; docs/checkpoints.md,\n"
          "                        elastic resume); when shrinking,\n"
          "      --keep I,J,...    the peers to keep (default the first P); when growing,\n"
          "      --clone-from N    new peers copy peer N's state, perturbed by\n"
          "      --clone-seed S    (default run.seed); else they start from their own seeds\n"
          "  -h, --help            this help, with every config key\n"
          "  -V, --version         version, git commit, MPI and OpenBLAS libraries\n"
          "\n"
          "commands:\n"
          "  kdpeers inspect FILE|RUN_DIR          what a checkpoint or model file holds\n"
          "  kdpeers export RUN_DIR|MODEL --peer N -o F  a standalone student: a model file\n"
          "                                        (.kdpm) or, with -o F.onnx, ONNX\n"
          "  kdpeers eval MODEL|RUN_DIR [-s ...]   test accuracy (of every peer and the ensemble)\n"
          "  [mpirun -np N] kdpeers serve RUN_DIR  serve /predict from a saved run, no training\n"
          "  kdpeers serve MODEL.kdpm              serve /predict from one model file\n"
          "  kdpeers plot RUN_DIR... [-o F.svg]    learning curves, several runs overlaid (every\n"
          "                                        run writes its own curves.svg)\n"
          "  kdpeers predict MODEL [INPUT...] [--json] [--top]  labels (and class names) and\n"
          "                                        probabilities, as kdpeers-predict; INPUT: IDX,\n"
          "                                        .npy or PNG files, raw pixels, '-' = stdin\n"
          "\n"
          "Environment: KDP_<SECTION>_<KEY> sets a key (the command line wins).\n"
          "Exit status: 0 done, 1 run failed, 2 bad usage or config or run.dir in use by\n"
          "another run, 75 stopped by a signal after a checkpoint (rerun to resume), 143 a\n"
          "second signal. Under mpirun, stop a run with SIGUSR1 (mpirun does not forward\n"
          "SIGTERM or SIGINT) or use launch/kdpeers-local.\n"
          "\n");
}

typedef struct cli {
  const char *files[32];
  int n_files;
  const char *sets[256];
  int n_sets;
  int print_config, print_model, help, version;
  kdp_run_opts opts;
  kdp_elastic elastic; /* --resume-as, --keep, --clone-from, --clone-seed */
} cli;

/* a non-negative integer option's value; -1 if it is not one */
static long opt_count(const char *s) {
  char *end;
  long v = strtol(s, &end, 10);
  return *s && !*end && v >= 0 && v < (1L << 30) ? v : -1;
}

static int parse_elastic(cli *c, const char *a, const char *v) {
  kdp_elastic *e = &c->elastic;
  if (strcmp(a, "--keep") == 0) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", v);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
      long k = opt_count(tok);
      if (k < 0 || e->n_keep >= KDP_MAX_PEERS) {
        fprintf(stderr, "kdpeers: --keep takes peer indices such as 0,2 (got '%s')\n", v);
        return -1;
      }
      e->keep[e->n_keep++] = (int)k;
    }
    if (e->n_keep == 0) {
      fprintf(stderr, "kdpeers: --keep takes peer indices such as 0,2\n");
      return -1;
    }
    return 0;
  }
  if (strcmp(a, "--clone-seed") == 0) {
    char *end;
    unsigned long long s = strtoull(v, &end, 10);
    if (!*v || *end || s == 0) {
      fprintf(stderr, "kdpeers: --clone-seed takes a positive integer (got '%s')\n", v);
      return -1;
    }
    e->clone_seed = s;
    return 0;
  }
  if (strcmp(a, "--resume-as") == 0 && strcmp(v, "auto") == 0) {
    e->P = -1; /* the cohort that fits the ranks (kdp_elastic_plan) */
    return 0;
  }
  long n = opt_count(v);
  if (n < 0 || (strcmp(a, "--resume-as") == 0 && n < 1)) {
    fprintf(stderr, "kdpeers: %s takes a %s (got '%s')\n", a,
            a[2] == 'r' ? "peer count of at least 1, or auto" : "peer index", v);
    return -1;
  }
  if (a[2] == 'r')
    e->P = (int)n;
  else
    e->clone_from = (int)n;
  return 0;
}

static int parse_cli(int argc, char **argv, cli *c) {
  memset(c, 0, sizeof *c);
  c->elastic.clone_from = -1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--resume-as") == 0 || strcmp(a, "--keep") == 0 ||
        strcmp(a, "--clone-from") == 0 || strcmp(a, "--clone-seed") == 0) {
      if (i + 1 >= argc) {
        fprintf(stderr, "kdpeers: %s needs an argument (see --help)\n", a);
        return -1;
      }
      if (parse_elastic(c, a, argv[++i]) != 0) return -1;
    } else if (strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0 || strcmp(a, "-s") == 0 ||
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
  if (!c->elastic.P && (c->elastic.n_keep || c->elastic.clone_from >= 0 || c->elastic.clone_seed)) {
    fprintf(stderr, "kdpeers: --keep, --clone-from and --clone-seed go with --resume-as P\n");
    return -1;
  }
  if (c->elastic.P && c->opts.fresh) {
    fprintf(stderr, "kdpeers: --resume-as continues a checkpoint; --fresh starts over\n");
    return -1;
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
  if ((rc = kdp_config_validate(cfg, err)) != 0) return rc;
  return kdp_frozen_resolve_arch(cfg, err); /* peer.N.teacher's arch from its file */
}

static int print_models(const kdp_config *cfg, const kdp_dist *d, kdp_error *err) {
  kdp_dataset tr, te;
  int rc = kdp_train_load_data(cfg, &tr, &te, err);
  if (rc != 0) return rc;
  kdp_input_shape in = {tr.H, tr.W, tr.C, tr.n_classes};
  kdp_memory_estimate *mem = kdp_xmalloc(sizeof *mem);
  rc = kdp_train_memory_estimate(cfg, d, &tr, &te, mem, err);
  if (rc == 0) kdp_train_memory_print(mem, stdout);
  if (rc == 0) rc = kdp_train_memory_check(mem, err);
  free(mem);
  for (int p = 0; p < d->n_peers && rc == 0; p++) {
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
  if (strcmp(cmd, "keys") == 0) { /* regenerates configs/default.ini and docs/config.md's table */
    int fmt = KDP_KEYS_TEXT;
    if (argc == 3 && strcmp(argv[2], "ini") == 0) fmt = KDP_KEYS_INI;
    else if (argc == 3 && strcmp(argv[2], "markdown") == 0) fmt = KDP_KEYS_MARKDOWN;
    else if (argc != 2 && !(argc == 3 && strcmp(argv[2], "text") == 0)) {
      fprintf(stderr, "usage: kdpeers keys [text|ini|markdown]\n");
      return EXIT_USAGE;
    }
    kdp_config_print_keys_fmt(stdout, fmt);
    return 0;
  }
  if (strcmp(cmd, "export") == 0) {
    kdp_export_opts o = {.pick = KDP_PICK_PEER};
    const char *fmt = NULL;
    for (int i = 2; i < argc; i++) {
      if (strcmp(argv[i], "--peer") == 0 && i + 1 < argc) {
        char *end;
        long peer = strtol(argv[++i], &end, 10);
        if (*end || peer < 0 || peer >= KDP_MAX_PEERS) {
          fprintf(stderr, "kdpeers export: --peer takes a peer index 0..%d\n", KDP_MAX_PEERS - 1);
          return EXIT_USAGE;
        }
        o.peer = (int)peer;
      } else if (strcmp(argv[i], "--ema") == 0) {
        o.pick = KDP_PICK_EMA;
      } else if (strcmp(argv[i], "--best") == 0) {
        o.pick = KDP_PICK_BEST;
      } else if (strcmp(argv[i], "--format") == 0 && i + 1 < argc) {
        fmt = argv[++i];
      } else if (strcmp(argv[i], "--classes") == 0 && i + 1 < argc) {
        o.classes = argv[++i];
      } else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) {
        o.out = argv[++i];
      } else if (!o.src && argv[i][0] != '-') {
        o.src = argv[i];
      } else {
        fprintf(stderr, "kdpeers export: unexpected '%s'\n", argv[i]);
        return EXIT_USAGE;
      }
    }
    if (!o.src || !o.out) {
      fprintf(stderr, "usage: kdpeers export RUN_DIR|MODEL.kdpm [--peer N | --ema | --best] "
                      "[--format kdpm|onnx] [--classes A,B,...] -o OUT\n");
      return EXIT_USAGE;
    }
    /* the format: --format, else the output's extension (.onnx), else kdpm */
    size_t ol = strlen(o.out);
    if (fmt ? strcmp(fmt, "onnx") == 0 : ol > 5 && strcmp(o.out + ol - 5, ".onnx") == 0)
      o.format = KDP_EXPORT_ONNX;
    else if (fmt && strcmp(fmt, "kdpm") != 0) {
      fprintf(stderr, "kdpeers export: --format takes kdpm or onnx, not '%s'\n", fmt);
      return EXIT_USAGE;
    }
    return kdp_tool_export(&o);
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
    /* kdpeers plot RUN_DIR... [-o F.svg], options anywhere */
    const char *out = NULL;
    const char **runs = kdp_xcalloc((size_t)argc, sizeof *runs);
    int n_runs = 0, bad = 0;
    for (int i = 2; i < argc && !bad; i++) {
      if (strcmp(argv[i], "-o") == 0 && i + 1 < argc && !out)
        out = argv[++i];
      else if (strncmp(argv[i], "-o", 2) == 0 && argv[i][2] && !out)
        out = argv[i] + 2;
      else if (argv[i][0] == '-')
        bad = 1;
      else
        runs[n_runs++] = argv[i];
    }
    if (bad || n_runs == 0) {
      fprintf(stderr, "usage: kdpeers plot RUN_DIR... [-o curves.svg]   (options in any order; "
                      "several runs are overlaid)\n");
      free(runs);
      return EXIT_USAGE;
    }
    char path[4200], why[512];
    if (out)
      snprintf(path, sizeof path, "%s", out);
    else if (n_runs == 1)
      snprintf(path, sizeof path, "%s/curves.svg", runs[0]);
    else
      snprintf(path, sizeof path, "curves.svg");
    int rc = kdp_plot_runs(runs, n_runs, path, why, sizeof why);
    free(runs);
    if (rc != 0) {
      fprintf(stderr, "kdpeers plot: %s\n", why);
      return 1;
    }
    printf("%s\n", path);
    return 0;
  }
  if (strcmp(cmd, "predict") == 0) {
    /* the same command line as kdpeers-predict (libkdpeers-infer) */
    argv[1] = "kdpeers predict";
    return kdp_predict_main(argc - 1, argv + 1);
  }
  return -1;
}

/* kdpeers serve RUN_DIR [-c FILE] [-s ...]: the run's newest checkpoint answers /predict, alone or
   under mpirun with the run's rank count (then with the method's teacher too). */
static int serve_main(int argc, char **argv) {
  if (argc < 3 || argv[2][0] == '-') {
    fprintf(stderr, "usage: [mpirun -np N] kdpeers serve RUN_DIR|MODEL.kdpm [-s server.port=8470] [...]\n");
    return EXIT_USAGE;
  }
  const char *run_dir = argv[2];
  cli c;
  if (parse_cli(argc - 2, argv + 2, &c) != 0) return EXIT_USAGE;
  kdp_error err = {{0}};
  struct stat st;
  if (stat(run_dir, &st) == 0 && S_ISREG(st.st_mode)) {
    /* one model file: one process, no MPI; server.* from the command line */
    kdp_config cfg;
    if (build_config(&c, &cfg, &err) != 0) {
      fprintf(stderr, "kdpeers serve: %s\n", err.msg);
      return EXIT_USAGE;
    }
    return kdp_tool_serve_alone(run_dir, &cfg);
  }
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
    rc = (rc == 0 || rc == KDP_ESTOPPED) ? 0 : rc == KDP_EINVAL ? EXIT_USAGE : 1;
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
    char mpi[512];
    kdp_dist_library_version(mpi, sizeof mpi);
    printf("kdpeers %s (git %s)\n%s\n%s\n", KDP_VERSION, kdp_git_hash(), mpi,
           openblas_get_config());
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
  /* --resume-as: the new cohort's per-peer settings and layout, from the checkpoint */
  if (c.elastic.P) {
    c.elastic.world = kdp_dist_world_size();
    int er = kdp_elastic_plan(&cfg, &c.elastic, &err);
    if (er != 0) {
      if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
      kdp_dist_finalize();
      return er == KDP_EINVAL ? EXIT_USAGE : 1;
    }
    c.opts.elastic = &c.elastic;
  }
  kdp_dist d;
  if (kdp_dist_setup_layout(&d, cfg.ranks_per_peer, cfg.peer_ranks_per_peer, KDP_MAX_PEERS,
                            &err) != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
    kdp_dist_finalize();
    return EXIT_USAGE;
  }
  if (c.elastic.P && kdp_elastic_check_layout(&c.elastic, &cfg, &d, &err) != 0) {
    if (rank == 0) fprintf(stderr, "kdpeers: %s\n", err.msg);
    kdp_dist_free(&d);
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
    rc = rank == 0 ? print_models(&cfg, &d, &err) : 0;
  } else {
    kdp_train_install_signals();
    rc = kdp_train_run(&cfg, &d, &c.opts, &err);
  }
  if (rc != 0 && rc != KDP_ESTOPPED) fprintf(stderr, "kdpeers: rank %d: %s\n", d.world_rank, err.msg);
  kdp_dist_free(&d);
  kdp_dist_finalize();
  if (rc == KDP_ESTOPPED) return KDP_EXIT_PREEMPTED;
  if (rc == KDP_EINVAL || rc == KDP_EBUSY) return EXIT_USAGE;
  return rc == 0 ? 0 : 1;
}
