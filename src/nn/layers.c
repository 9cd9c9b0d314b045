/* layers.c: not written yet */
