/* roofline.c: kdp-roofline, the single-core OpenBLAS sgemm speed at a square size and at the
 * exact GEMM shapes one training step of a model performs, and the resulting "model roofline"
 * (the step time if every GEMM ran at its measured speed and nothing else cost anything).
 *
 * Usage: kdp-roofline [--batch N] [--model ARCH]... [--size N] [--seconds S] [--samples N]
 *                     [--conv-chunk F] [--json FILE]
 *   ARCH: mlp(h1,h2,...) or cnn, on 28x28x1 inputs with 10 classes (Fashion-MNIST).
 *
 * FLOP convention: 2*M*N*K per GEMM. A layer contributes its forward GEMM, its weight-gradient
 * GEMM and its input-gradient GEMM, except the FIRST layer, whose input gradient is not needed
 * (so a step is 3x forward minus the first layer's forward). Bias, ReLU, pooling, im2col and the
 * optimizer are not counted. The shapes are the ones a row-major llm.c-style implementation
 * uses (conv via im2col, NHWC), first over the whole batch, then (for models with convs) also
 * with the batch split into chunks as src/nn/layers.c does (--conv-chunk):
 *   dense  fwd  out(BxO)  = in(BxI) . w(OxI)^T        M=B    N=O    K=I
 *          dW   dw(OxI)  += dout(BxO)^T . in(BxI)     M=O    N=I    K=B
 *          dX   din(BxI) += dout(BxO) . w(OxI)        M=B    N=I    K=O
 *   conv   P = B*OH*OW rows, Q = K*K*Cin columns of the im2col matrix
 *          fwd  out(PxCout) = cols(PxQ) . w(CoutxQ)^T  M=P    N=Cout K=Q
 *          dW   dw(CoutxQ) += dout^T . cols           M=Cout N=Q    K=P
 *          dX   dcols(PxQ)  = dout . w                M=P    N=Q    K=Cout
 */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_GEMMS 64
#define MAX_MODELS 8

typedef struct gemm {
  char name[48];
  int trans_a, trans_b; /* operand stored transposed (row-major) */
  size_t M, N, K;
  float beta;           /* 1 for accumulating gradients */
  size_t count;         /* calls per step (conv chunks) */
  double flops;         /* of one call: 2*M*N*K */
  double gflops_best, gflops_median;
} gemm;

typedef struct model {
  char arch[128];
  size_t conv_chunk_floats; /* 0: conv GEMMs over the whole batch */
  int has_conv;
  size_t n;
  gemm g[MAX_GEMMS];
  double flops_per_step, roofline_seconds, roofline_seconds_median;
} model;

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int add_gemm_n(model *m, const char *name, int ta, int tb, size_t M, size_t N, size_t K,
                      float beta, size_t count) {
  if (m->n >= MAX_GEMMS) {
    fprintf(stderr, "kdp-roofline: model '%s' has more than %d GEMMs\n", m->arch, MAX_GEMMS);
    return -1;
  }
  gemm *g = &m->g[m->n++];
  memset(g, 0, sizeof *g);
  snprintf(g->name, sizeof g->name, "%s", name);
  g->trans_a = ta;
  g->trans_b = tb;
  g->M = M;
  g->N = N;
  g->K = K;
  g->beta = beta;
  g->count = count;
  g->flops = 2.0 * (double)M * (double)N * (double)K;
  return 0;
}

static int add_gemm(model *m, const char *name, int ta, int tb, size_t M, size_t N, size_t K,
                    float beta) {
  return add_gemm_n(m, name, ta, tb, M, N, K, beta, 1);
}

static int add_dense(model *m, const char *layer, size_t B, size_t din, size_t dout,
                     int first) {
  char nm[48];
  snprintf(nm, sizeof nm, "%s.fwd", layer);
  if (add_gemm(m, nm, 0, 1, B, dout, din, 0.0f)) return -1;
  snprintf(nm, sizeof nm, "%s.dW", layer);
  if (add_gemm(m, nm, 1, 0, dout, din, B, 1.0f)) return -1;
  if (!first) {
    snprintf(nm, sizeof nm, "%s.dX", layer);
    if (add_gemm(m, nm, 0, 0, B, din, dout, 1.0f)) return -1;
  }
  return 0;
}

/* the three GEMMs of a conv over nb samples of P1 = OH*OW rows each, `count` times */
static int add_conv_part(model *m, const char *layer, size_t nb, size_t P1, size_t Q,
                         size_t cout, int first, size_t count, const char *suffix) {
  char nm[48];
  size_t P = nb * P1;
  snprintf(nm, sizeof nm, "%s.fwd%s", layer, suffix);
  if (add_gemm_n(m, nm, 0, 1, P, cout, Q, 0.0f, count)) return -1;
  snprintf(nm, sizeof nm, "%s.dW%s", layer, suffix);
  if (add_gemm_n(m, nm, 1, 0, cout, Q, P, 1.0f, count)) return -1;
  if (!first) {
    snprintf(nm, sizeof nm, "%s.dX%s", layer, suffix);
    if (add_gemm_n(m, nm, 0, 0, P, Q, cout, 0.0f, count)) return -1;
  }
  return 0;
}

/* 'same' conv, stride 1, kernel k, on an H x W x cin input. With m->conv_chunk_floats > 0 the
   batch is split like src/nn/layers.c does: chunks of at most max(1, target / (H*W*max(k*k*cin,
   cout))) samples (the im2col matrix or the output, whichever is larger), balanced. */
static int add_conv(model *m, const char *layer, size_t B, size_t H, size_t W, size_t cin,
                    size_t cout, size_t k, int first) {
  size_t P1 = H * W, Q = k * k * cin;
  m->has_conv = 1;
  if (m->conv_chunk_floats == 0) return add_conv_part(m, layer, B, P1, Q, cout, first, 1, "");
  size_t nb = m->conv_chunk_floats / (P1 * (Q > cout ? Q : cout));
  if (nb < 1) nb = 1;
  if (nb > B) nb = B;
  /* as src/nn/par.c kdp_chunk_count: ceil(B / nb) chunks rounded up to a multiple of 4, of
     balanced sizes (B / n and B / n + 1 samples) */
  size_t n = (B + nb - 1) / nb;
  if (n > 1) n = (n + 3) & ~(size_t)3;
  if (n > B) n = B;
  size_t small = B / n, big = B % n;
  if (add_conv_part(m, layer, small, P1, Q, cout, first, n - big, "")) return -1;
  if (big) return add_conv_part(m, layer, small + 1, P1, Q, cout, first, big, ".big");
  return 0;
}

/* Builds the GEMM list of one training step. Inputs are 28x28x1, 10 classes. */
static int model_build(model *m, const char *arch, size_t B, size_t conv_chunk_floats) {
  memset(m, 0, sizeof *m);
  snprintf(m->arch, sizeof m->arch, "%s", arch);
  m->conv_chunk_floats = conv_chunk_floats;
  if (strcmp(arch, "cnn") == 0) {
    /* conv(32,3,pad 1) relu maxpool2, conv(64,3,pad 1) relu maxpool2, fc 3136->128 relu, fc->10 */
    if (add_conv(m, "conv1", B, 28, 28, 1, 32, 3, 1)) return -1;
    if (add_conv(m, "conv2", B, 14, 14, 32, 64, 3, 0)) return -1;
    if (add_dense(m, "fc1", B, 7 * 7 * 64, 128, 0)) return -1;
    if (add_dense(m, "fc2", B, 128, 10, 0)) return -1;
  } else if (strncmp(arch, "mlp(", 4) == 0) {
    const char *p = arch + 4;
    size_t in = 28 * 28, layer = 0;
    char nm[16];
    for (;;) {
      char *end;
      errno = 0;
      long h = strtol(p, &end, 10);
      if (end == p || errno || h <= 0 || h > 1000000 || (*end != ',' && *end != ')')) {
        fprintf(stderr,
                "kdp-roofline: bad --model '%s': expected mlp(h1,h2,...) with positive "
                "integer sizes, e.g. mlp(512,256)\n", arch);
        return -1;
      }
      snprintf(nm, sizeof nm, "fc%zu", ++layer);
      if (add_dense(m, nm, B, in, (size_t)h, layer == 1)) return -1;
      in = (size_t)h;
      p = end + 1;
      if (*end == ')') break;
    }
    if (*p != '\0') {
      fprintf(stderr, "kdp-roofline: bad --model '%s': trailing text after ')'\n", arch);
      return -1;
    }
    snprintf(nm, sizeof nm, "fc%zu", ++layer);
    if (add_dense(m, nm, B, in, 10, 0)) return -1;
  } else {
    fprintf(stderr, "kdp-roofline: unknown --model '%s' (expected cnn or mlp(h1,h2,...))\n",
            arch);
    return -1;
  }
  for (size_t i = 0; i < m->n; i++) m->flops_per_step += (double)m->g[i].count * m->g[i].flops;
  return 0;
}

static float *alloc_random(size_t n, uint64_t *state) {
  float *p = NULL;
  if (posix_memalign((void **)&p, 64, (n ? n : 1) * sizeof(float)) != 0) return NULL;
  for (size_t i = 0; i < n; i++) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = (float)((*state >> 40) & 0xffff) / 65536.0f - 0.5f;
  }
  return p;
}

static void run_gemm(const gemm *g, const float *A, const float *Bm, float *C) {
  /* row-major: A is M x K (stored K x M if transposed), B is K x N (stored N x K if transposed) */
  int lda = (int)(g->trans_a ? g->M : g->K);
  int ldb = (int)(g->trans_b ? g->K : g->N);
  cblas_sgemm(CblasRowMajor, g->trans_a ? CblasTrans : CblasNoTrans,
              g->trans_b ? CblasTrans : CblasNoTrans, (int)g->M, (int)g->N, (int)g->K, 1.0f, A,
              lda, Bm, ldb, g->beta, C, (int)g->N);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Times g: one warm-up call, then `samples` samples of enough calls to fill seconds/samples. */
static int time_gemm(gemm *g, double seconds, int samples) {
  uint64_t st = 0x9e3779b97f4a7c15ULL ^ (uint64_t)(g->M * 31 + g->N * 17 + g->K);
  float *A = alloc_random(g->M * g->K, &st);
  float *Bm = alloc_random(g->K * g->N, &st);
  float *C = alloc_random(g->M * g->N, &st);
  double *gf = calloc((size_t)samples, sizeof *gf);
  if (!A || !Bm || !C || !gf) {
    fprintf(stderr, "kdp-roofline: out of memory for GEMM %s (%zux%zu)x(%zux%zu)\n", g->name,
            g->M, g->K, g->K, g->N);
    free(A), free(Bm), free(C), free(gf);
    return -1;
  }
  double t0 = now_seconds();
  run_gemm(g, A, Bm, C); /* warm-up: page faults, buffer allocation inside OpenBLAS */
  run_gemm(g, A, Bm, C);
  double t1 = (now_seconds() - t0) / 2.0;
  double per_sample = seconds / samples;
  long reps = t1 > 0 ? (long)ceil(per_sample / t1) : 1000;
  if (reps < 1) reps = 1;
  for (int s = 0; s < samples; s++) {
    double a = now_seconds();
    for (long r = 0; r < reps; r++) run_gemm(g, A, Bm, C);
    double dt = now_seconds() - a;
    gf[s] = g->flops * (double)reps / dt / 1e9;
  }
  qsort(gf, (size_t)samples, sizeof *gf, cmp_double);
  g->gflops_best = gf[samples - 1];
  g->gflops_median = samples % 2 ? gf[samples / 2] : 0.5 * (gf[samples / 2 - 1] + gf[samples / 2]);
  free(A), free(Bm), free(C), free(gf);
  return 0;
}

static void json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; s && *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c < 0x20) fprintf(f, "\\u%04x", c);
    else fputc(c, f);
  }
  fputc('"', f);
}

static const char *env_or(const char *name, const char *dflt) {
  const char *v = getenv(name);
  return v ? v : dflt;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: kdp-roofline [--batch N] [--model ARCH]... [--size N] [--seconds S]\n"
          "                    [--samples N] [--conv-chunk F] [--json FILE]\n"
          "  --batch N     batch size of the model GEMM shapes (default 128)\n"
          "  --model ARCH  cnn or mlp(h1,h2,...); repeatable (default: mlp(512,256) and cnn)\n"
          "  --size N      square sgemm size for the peak (default 2048)\n"
          "  --seconds S   timing budget per GEMM shape (default 0.3)\n"
          "  --samples N   timed samples per shape; best and median are reported (default 5)\n"
          "  --conv-chunk F  also time conv GEMMs split into batch chunks whose im2col matrix\n"
          "                has at most F floats, as src/nn/layers.c does (default 524288;\n"
          "                0 = whole batch only)\n"
          "  --json FILE   also write the results as JSON to FILE ('-' = stdout)\n");
}

static int parse_long(const char *opt, const char *v, long lo, long hi, long *out) {
  char *end;
  errno = 0;
  long x = v ? strtol(v, &end, 10) : 0;
  if (!v || end == v || *end || errno || x < lo || x > hi) {
    fprintf(stderr, "kdp-roofline: %s expects an integer in [%ld, %ld], got '%s'\n", opt, lo, hi,
            v ? v : "(nothing)");
    return -1;
  }
  *out = x;
  return 0;
}

int main(int argc, char **argv) {
  long batch = 128, size = 2048, samples = 5, conv_chunk = 1L << 19;
  double seconds = 0.3;
  const char *json_path = NULL;
  const char *archs[MAX_MODELS];
  int n_archs = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--batch")) {
      if (parse_long(a, v, 1, 65536, &batch)) return 2;
      i++;
    } else if (!strcmp(a, "--size")) {
      if (parse_long(a, v, 1, 16384, &size)) return 2;
      i++;
    } else if (!strcmp(a, "--conv-chunk")) {
      if (parse_long(a, v, 0, 1L << 30, &conv_chunk)) return 2;
      i++;
    } else if (!strcmp(a, "--samples")) {
      if (parse_long(a, v, 1, 1000, &samples)) return 2;
      i++;
    } else if (!strcmp(a, "--seconds")) {
      char *end;
      seconds = v ? strtod(v, &end) : 0;
      if (!v || end == v || *end || !(seconds > 0 && seconds <= 600)) {
        fprintf(stderr, "kdp-roofline: --seconds expects a number in (0, 600], got '%s'\n",
                v ? v : "(nothing)");
        return 2;
      }
      i++;
    } else if (!strcmp(a, "--model")) {
      if (!v) {
        fprintf(stderr, "kdp-roofline: --model needs an architecture, e.g. cnn\n");
        return 2;
      }
      if (n_archs >= MAX_MODELS) {
        fprintf(stderr, "kdp-roofline: at most %d --model options\n", MAX_MODELS);
        return 2;
      }
      archs[n_archs++] = v;
      i++;
    } else if (!strcmp(a, "--json")) {
      if (!v) {
        fprintf(stderr, "kdp-roofline: --json needs a file name\n");
        return 2;
      }
      json_path = v;
      i++;
    } else {
      fprintf(stderr, "kdp-roofline: unknown option '%s'\n", a);
      usage(stderr);
      return 2;
    }
  }
  if (n_archs == 0) {
    archs[n_archs++] = "mlp(512,256)";
    archs[n_archs++] = "cnn";
  }

  /* each arch with whole-batch conv GEMMs, and (if it has convs) chunked like layers.c */
  static model models[2 * MAX_MODELS];
  int n_models = 0;
  for (int i = 0; i < n_archs; i++) {
    if (model_build(&models[n_models++], archs[i], (size_t)batch, 0)) return 2;
    if (conv_chunk > 0 && models[n_models - 1].has_conv)
      if (model_build(&models[n_models++], archs[i], (size_t)batch, (size_t)conv_chunk))
        return 2;
  }

  openblas_set_num_threads(1);
  const char *cfg = openblas_get_config();
  const char *core = openblas_get_corename();
  printf("kdp-roofline: OpenBLAS config: %s\n", cfg ? cfg : "?");
  printf("kdp-roofline: sgemm kernel (core): %s, threads %d\n", core ? core : "?",
         openblas_get_num_threads());
  printf("kdp-roofline: env OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s OPENBLAS_NUM_THREADS=%s\n",
         env_or("OPENBLAS_CORETYPE", "(unset)"), env_or("OPENBLAS_L2_SIZE", "(unset)"),
         env_or("OPENBLAS_NUM_THREADS", "(unset)"));
  printf("kdp-roofline: %.2f s per shape, %ld samples, best and median GFLOP/s\n\n", seconds,
         samples);

  gemm sq;
  memset(&sq, 0, sizeof sq);
  snprintf(sq.name, sizeof sq.name, "square%ld", size);
  sq.M = sq.N = sq.K = (size_t)size;
  sq.flops = 2.0 * (double)size * (double)size * (double)size;
  /* the square peak gets a larger budget: each call is long */
  if (time_gemm(&sq, seconds * 2, (int)samples)) return 1;
  printf("%-22s %-28s %10s %9.1f %9.1f\n", sq.name, "", "", sq.gflops_best, sq.gflops_median);

  for (int i = 0; i < n_models; i++) {
    model *m = &models[i];
    char variant[96] = "";
    if (m->conv_chunk_floats)
      snprintf(variant, sizeof variant, ", convs in batch chunks (im2col or output <= %zu floats)",
               m->conv_chunk_floats);
    printf("\n%s, batch %ld%s: %.1f MFLOP per step in %zu GEMM shapes\n", m->arch, batch,
           variant, m->flops_per_step / 1e6, m->n);
    printf("%-22s %-28s %5s %9s %9s %9s %9s\n", "gemm", "(MxK).(KxN)", "calls", "MFLOP",
           "GF/s best", "GF/s med", "ms best");
    for (size_t j = 0; j < m->n; j++) {
      gemm *g = &m->g[j];
      if (time_gemm(g, seconds, (int)samples)) return 1;
      double fl = (double)g->count * g->flops;
      m->roofline_seconds += fl / (g->gflops_best * 1e9);
      m->roofline_seconds_median += fl / (g->gflops_median * 1e9);
      char shp[64];
      snprintf(shp, sizeof shp, "(%zux%zu)%s.(%zux%zu)%s", g->M, g->K, g->trans_a ? "T" : "",
               g->K, g->N, g->trans_b ? "T" : "");
      printf("%-22s %-28s %5zu %9.2f %9.1f %9.1f %9.3f\n", g->name, shp, g->count, fl / 1e6,
             g->gflops_best, g->gflops_median, 1e3 * fl / (g->gflops_best * 1e9));
    }
    printf("%s%s model roofline: %.3f ms/step (%.1f GFLOP/s FLOP-weighted; %.3f ms with median "
           "speeds), %.1f%% of the %ld^3 peak\n",
           m->arch, m->conv_chunk_floats ? " (chunked)" : "", 1e3 * m->roofline_seconds, m->flops_per_step / m->roofline_seconds / 1e9,
           1e3 * m->roofline_seconds_median,
           100.0 * m->flops_per_step / m->roofline_seconds / 1e9 / sq.gflops_best, size);
  }

  if (json_path) {
    FILE *f = strcmp(json_path, "-") == 0 ? stdout : fopen(json_path, "w");
    if (!f) {
      fprintf(stderr, "kdp-roofline: cannot write --json '%s': %s\n", json_path,
              strerror(errno));
      return 1;
    }
    fprintf(f, "{\"openblas_config\":");
    json_str(f, cfg);
    fprintf(f, ",\"openblas_corename\":");
    json_str(f, core);
    fprintf(f, ",\"threads\":%d,\"env\":{", openblas_get_num_threads());
    const char *envs[] = {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                          "OMP_NUM_THREADS"};
    for (size_t e = 0; e < sizeof envs / sizeof envs[0]; e++) {
      fprintf(f, "%s\"%s\":", e ? "," : "", envs[e]);
      if (getenv(envs[e])) json_str(f, getenv(envs[e]));
      else fprintf(f, "null");
    }
    fprintf(f,
            "},\"flop_convention\":\"2*M*N*K per GEMM; forward, weight-gradient and "
            "input-gradient GEMM per layer except the first layer's input gradient\","
            "\"seconds_per_shape\":%g,\"samples\":%ld,\"batch\":%ld,"
            "\"square\":{\"n\":%ld,\"gflops_best\":%.3f,\"gflops_median\":%.3f},\"models\":[",
            seconds, samples, batch, size, sq.gflops_best, sq.gflops_median);
    for (int i = 0; i < n_models; i++) {
      model *m = &models[i];
      fprintf(f, "%s{\"arch\":", i ? "," : "");
      json_str(f, m->arch);
      fprintf(f,
              ",\"conv_chunk_floats\":%zu,\"flops_per_step\":%.0f,\"roofline_seconds_per_step\":%.6e,"
              "\"roofline_seconds_per_step_median\":%.6e,\"roofline_gflops\":%.3f,\"gemms\":[",
              m->conv_chunk_floats, m->flops_per_step, m->roofline_seconds, m->roofline_seconds_median,
              m->flops_per_step / m->roofline_seconds / 1e9);
      for (size_t j = 0; j < m->n; j++) {
        gemm *g = &m->g[j];
        fprintf(f, "%s{\"name\":", j ? "," : "");
        json_str(f, g->name);
        fprintf(f,
                ",\"M\":%zu,\"N\":%zu,\"K\":%zu,\"trans_a\":%d,\"trans_b\":%d,\"beta\":%g,"
                "\"calls_per_step\":%zu,\"flops_per_call\":%.0f,\"gflops_best\":%.3f,\"gflops_median\":%.3f}",
                g->M, g->N, g->K, g->trans_a, g->trans_b, (double)g->beta, g->count, g->flops,
                g->gflops_best, g->gflops_median);
      }
      fprintf(f, "]}");
    }
    fprintf(f, "]}\n");
    if (f != stdout && fclose(f) != 0) {
      fprintf(stderr, "kdp-roofline: error writing '%s': %s\n", json_path, strerror(errno));
      return 1;
    }
  }
  return 0;
}
