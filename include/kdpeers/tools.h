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
   (peers, ensemble, teacher) from RUN_DIR/metrics.jsonl. Returns 0, or -1 with why filled. */
int kdp_plot_run(const char *run_dir, const char *out_path, char *why, size_t why_len);

/* kdpeers serve RUN_DIR in one process: /predict answered by every peer of the run's newest
   checkpoint and their ensemble (no method teacher), /metrics, /status, /control stop. */
int kdp_tool_serve_alone(const char *run_dir, const kdp_config *cfg);
/* The config text stored in the run's newest checkpoint, written to a temporary INI file whose
   path goes into out (caller unlinks it); also the number of ranks that wrote it. */
int kdp_tool_saved_config(const char *run_dir, char *out, size_t n, int *n_ranks, kdp_error *err);

#endif
