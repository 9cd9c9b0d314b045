/* predict.c: the command line of kdpeers-predict (and `kdpeers predict`): a model file, images in,
   labels and probabilities out as text or JSON lines; --bench times the prediction itself. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"

#include "kdpeers/infer.h"

#define DEFAULT_BATCH 256

static void usage(FILE *f, const char *prog) {
  fprintf(f,
          "usage: %s MODEL.kdpm [INPUT...] [--json] [--top] [--batch N] [--threads N]\n"
          "       %s MODEL.kdpm [INPUT...] --bench REPS [--batch N]\n"
          "       %s --version\n"
          "INPUT: an IDX image file (raw or .gz), a NumPy .npy image array (uint8 or float32), a\n"
          "PNG, a file of raw uint8 pixels (H x W x C per image), or '-' for raw pixels on\n"
          "standard input (the default). One line per image:\n"
          "  text: index label [class] p0 p1 ...   (class, with '_' for spaces, when the model\n"
          "        carries class names; --top: index label [class])\n"
          "  --json: {\"index\":0,\"source\":\"FILE\",\"label\":9,\"class\":\"...\",\"probs\":[...]}\n"
          "--bench REPS: no output per image; times REPS predictions of the first N images\n"
          "(normalisation, forward, softmax) and prints one JSON line.\n",
          prog, prog, prog);
}

static void json_str(const char *s) {
  putchar('"');
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      printf("\\%c", c);
    else if (c < 0x20)
      printf("\\u%04x", c);
    else
      putchar(c);
  }
  putchar('"');
}

static void print_line(const kdp_modelfile *mf, const kdp_images *imgs, size_t i, const float *p,
                       int json, int top) {
  size_t C = mf->in.n_classes, am = kdp_argmax(p, C);
  const char *name = mf->class_names ? mf->class_names[am] : NULL;
  if (json) {
    printf("{\"index\":%zu,\"source\":", i);
    json_str(imgs->sources[imgs->source_of[i]]);
    printf(",\"label\":%zu", am);
    if (name) {
      printf(",\"class\":");
      json_str(name);
    }
    if (!top) {
      printf(",\"probs\":[");
      for (size_t k = 0; k < C; k++) printf(k ? ",%.9g" : "%.9g", (double)p[k]);
      putchar(']');
    }
    puts("}");
    return;
  }
  printf("%zu %zu", i, am);
  if (name) {
    putchar(' ');
    for (const char *s = name; *s; s++) putchar(*s == ' ' ? '_' : *s);
  }
  if (!top)
    for (size_t k = 0; k < C; k++) printf(" %.5f", (double)p[k]);
  putchar('\n');
}

static int bench(kdp_modelfile *mf, const kdp_images *imgs, size_t batch, long reps) {
  if (imgs->n < batch) {
    fprintf(stderr, "kdpeers-predict: --bench with --batch %zu needs at least %zu images (got %zu)\n",
            batch, batch, imgs->n);
    return 2;
  }
  float *p = kdp_falloc(batch * mf->in.n_classes);
  long warm = reps / 10 + 1;
  size_t elem = kdp_images_elem(imgs);
  for (long r = 0; r < warm; r++) kdp_modelfile_predict(mf, imgs->pix, elem, batch, p);
  double t0 = kdp_now();
  for (long r = 0; r < reps; r++) kdp_modelfile_predict(mf, imgs->pix, elem, batch, p);
  double dt = kdp_now() - t0;
  printf("{\"impl\":\"kdpeers\",\"arch\":\"%s\",\"batch\":%zu,\"reps\":%ld,\"seconds\":%.6f,"
         "\"us_per_batch\":%.3f,\"images_per_second\":%.1f}\n",
         kdp_model_arch(mf->m), batch, reps, dt, 1e6 * dt / (double)reps,
         (double)reps * (double)batch / dt);
  free(p);
  return 0;
}

int kdp_predict_main(int argc, char **argv) {
  const char *prog = argv[0], *model = NULL;
  const char **inputs = kdp_xcalloc((size_t)argc + 1, sizeof *inputs);
  size_t n_inputs = 0, batch = DEFAULT_BATCH;
  int json = 0, top = 0, threads = 0;
  long reps = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    char *end = NULL;
    if (strcmp(a, "--json") == 0) {
      json = 1;
    } else if (strcmp(a, "--top") == 0) {
      top = 1;
    } else if ((strcmp(a, "--batch") == 0 || strcmp(a, "--threads") == 0 ||
                strcmp(a, "--bench") == 0) && i + 1 < argc) {
      long v = strtol(argv[++i], &end, 10);
      if (*end || v < 1 || v > 1000000) {
        fprintf(stderr, "%s: %s takes a positive integer, got '%s'\n", prog, a, argv[i]);
        free(inputs);
        return 2;
      }
      if (a[2] == 'b' && a[3] == 'a') batch = (size_t)v;
      else if (a[2] == 't') threads = (int)v;
      else reps = v;
    } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout, prog);
      free(inputs);
      return 0;
    } else if (strcmp(a, "-V") == 0 || strcmp(a, "--version") == 0) {
      /* the same version line as kdpeers --version (the runtime has no MPI to name) */
      const char *name = strrchr(prog, '/');
      printf("%s %s (git %s)\n%s\n", name ? name + 1 : prog, KDP_VERSION, kdp_git_hash(),
             openblas_get_config());
      free(inputs);
      return 0;
    } else if (a[0] == '-' && a[1]) {
      fprintf(stderr, "%s: unknown option '%s' (see --help)\n", prog, a);
      free(inputs);
      return 2;
    } else if (!model) {
      model = a;
    } else {
      inputs[n_inputs++] = a;
    }
  }
  if (!model) {
    usage(stderr, prog);
    free(inputs);
    return 2;
  }
  if (n_inputs == 0) inputs[n_inputs++] = "-";
  if (threads) openblas_set_num_threads(threads);
  kdp_error err;
  kdp_modelfile mf;
  if (kdp_modelfile_read(&mf, model, batch, &err) != 0) {
    fprintf(stderr, "%s: %s\n", prog, err.msg);
    free(inputs);
    return 1;
  }
  kdp_images imgs = {.H = mf.in.H, .W = mf.in.W, .C = mf.in.C};
  int rc = 0;
  for (size_t i = 0; i < n_inputs && rc == 0; i++)
    if (kdp_images_append(&imgs, inputs[i], &err) != 0) {
      fprintf(stderr, "%s: %s\n", prog, err.msg);
      rc = 1;
    }
  if (rc == 0 && reps > 0) {
    rc = bench(&mf, &imgs, batch, reps);
  } else if (rc == 0) {
    size_t C = mf.in.n_classes, elem = kdp_images_elem(&imgs);
    size_t isz = mf.in.H * mf.in.W * mf.in.C * elem;
    float *p = kdp_falloc(batch * C);
    for (size_t first = 0; first < imgs.n; first += batch) {
      size_t b = imgs.n - first < batch ? imgs.n - first : batch;
      kdp_modelfile_predict(&mf, imgs.pix + first * isz, elem, b, p);
      for (size_t r = 0; r < b; r++) print_line(&mf, &imgs, first + r, p + r * C, json, top);
    }
    free(p);
    if (fflush(stdout) != 0) rc = 1;
  }
  kdp_images_free(&imgs);
  kdp_modelfile_free(&mf);
  free(inputs);
  return rc;
}
