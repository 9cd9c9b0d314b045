/* layers_naive.c: not written yet */
