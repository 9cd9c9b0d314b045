/* onnx.h: a student as an ONNX model (protobuf-c over Debian's onnx.proto), eval mode. */
#ifndef KDPEERS_ONNX_H
#define KDPEERS_ONNX_H

#include "kdpeers/infer.h"

/* The ONNX versions written: operator set 13 (ai.onnx), IR version 7. */
#define KDP_ONNX_OPSET 13
#define KDP_ONNX_IR_VERSION 7

/* Writes mf's model (batchnorm as BatchNormalization with the running statistics, dropout as the
   identity) to path. Input "pixels": float32 [N, C, H, W], raw values 0..255, normalised inside
   the graph with mf's mean and std; output "logits": [N, classes]. metadata_props: arch,
   kdpeers_version, input, normalisation and, when mf has them, class_names (a JSON array). */
int kdp_onnx_write(const kdp_modelfile *mf, const char *path, kdp_error *err);

#endif
