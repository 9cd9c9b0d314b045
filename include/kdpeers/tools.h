/* tools.h: the artefact commands (inspect, export, eval, predict) behind `kdpeers COMMAND`. */
#ifndef KDPEERS_TOOLS_H
#define KDPEERS_TOOLS_H

#include "kdpeers/config.h"

/* Each returns a process exit status (0 ok, 1 failure) and prints its own messages. */

/* What a checkpoint or model file holds, with a crc32 digest per tensor; for a run directory, its
   newest complete checkpoint's manifest. */
int kdp_tool_inspect(const char *path);
/* Writes peer `peer` of the run's newest complete checkpoint as a standalone model file. */
int kdp_tool_export(const char *run_dir, int peer, const char *out_path);
/* Test accuracy of a model file, or of every peer of a run and their ensemble, on the test set
   named by cfg (data.test_images / data.test_labels). */
int kdp_tool_eval(const char *path, const kdp_config *cfg);
/* Labels and probabilities for the images of the inputs, in order: IDX image files (raw or
   .gz), .npy image arrays, .png files, or "-" (raw uint8 pixels on stdin). One line per image:
   "index label p0 p1 ...", with the class name after the label when the model has class names
   (image-folder datasets). top_only prints only index, label (and name). */
int kdp_tool_predict(const char *model_path, const char *const *inputs, int n_inputs,
                     int top_only);

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

/* kdpeers serve RUN_DIR in one process: /predict answered by every peer of the run's newest
   checkpoint and their ensemble (no method teacher), /metrics, /status, /control stop. */
int kdp_tool_serve_alone(const char *run_dir, const kdp_config *cfg);
/* The config text stored in the run's newest checkpoint, written to a temporary INI file whose
   path goes into out (caller unlinks it); also the number of ranks that wrote it. */
int kdp_tool_saved_config(const char *run_dir, char *out, size_t n, int *n_ranks, kdp_error *err);

#endif
