/* kdpeers-predict.c: the MPI-free prediction command (libkdpeers-infer's CLI). */
#include "kdpeers/infer.h"

int main(int argc, char **argv) { return kdp_predict_main(argc, argv); }
