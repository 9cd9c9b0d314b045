/* tools.h: the artefact commands (inspect, export, eval, predict) behind `kdpeers COMMAND`. */
#ifndef KDPEERS_TOOLS_H
#define KDPEERS_TOOLS_H

#include "kdpeers/config.h"

/* Each returns a process exit status (0 ok, 1 failure) and prints its own messages. */

/* What a checkpoint or model file holds, with a crc32 digest per tensor; for a run directory, its
   newest complete checkpoint's manifest. */
int kdp_tool_inspect(const char *path);
/* kdpeers export: which model of the source to export, and as what. */
typedef enum kdp_export_pick {
  KDP_PICK_PEER, /* --peer N (default 0) */
  KDP_PICK_EMA,  /* --ema: peer N's EMA copy (run.ema_decay; pcl's mean teacher), from a run dir */
  KDP_PICK_BEST  /* --best: the peer (or EMA copy) with the best validation accuracy at the run's
                    last evaluation (data.val_size; a run without a split: exit 2) */
} kdp_export_pick;
typedef enum kdp_export_format { KDP_EXPORT_KDPM = 0, KDP_EXPORT_ONNX = 1 } kdp_export_format;
typedef struct kdp_export_opts {
  const char *src;     /* a run directory (its newest complete checkpoint) or a .kdpm */
  kdp_export_pick pick;
  int peer;
  const char *out;
  kdp_export_format format;
  const char *classes; /* class names, comma-separated, or NULL: the source's, or those the run's
                          data imply (Fashion-MNIST, CIFAR's label files) */
} kdp_export_opts;
/* Writes one model of a run (or a model file) as a model file (.kdpm, format 2) or ONNX. */
int kdp_tool_export(const kdp_export_opts *o);
/* Test accuracy of a model file, or of every peer of a run and their ensemble, on the test set
   named by cfg (data.test_images / data.test_labels). */
int kdp_tool_eval(const char *path, const kdp_config *cfg);

/* Learning curves: an SVG of test accuracy and loss against epoch for every evaluated model
   (peers, ensemble, teacher) and of peer 0's training loss (each log window) from
   RUN_DIR/metrics.jsonl. Returns 0, or -1 with why filled. */
int kdp_plot_run(const char *run_dir, const char *out_path, char *why, size_t why_len);
/* The same with several runs overlaid (series named "RUN model", RUN the directory's name). */
int kdp_plot_runs(const char *const *run_dirs, int n_runs, const char *out_path, char *why,
                  size_t why_len);
/* Round axis bounds for [lo, hi] with about `ticks` ticks: lo' <= lo and hi' >= hi multiples of
   step, step 1, 2 or 5 times a power of ten; decimals prints each tick exactly. */
void kdp_plot_nice_axis(double lo, double hi, int ticks, double *out_lo, double *out_hi,
                        double *out_step, int *decimals);

/* kdpeers serve RUN_DIR|MODEL.kdpm in one process: /predict answered by every peer of the run's
   newest checkpoint and their ensemble (no method teacher), or by the one model; /metrics,
   /status, /control stop. The address goes to RUN_DIR/server.addr or MODEL.kdpm.addr. */
int kdp_tool_serve_alone(const char *run_dir, const kdp_config *cfg);
/* The config text stored in the run's newest checkpoint, written to a temporary INI file whose
   path goes into out (caller unlinks it); also the number of ranks that wrote it. */
int kdp_tool_saved_config(const char *run_dir, char *out, size_t n, int *n_ranks, kdp_error *err);

#endif
