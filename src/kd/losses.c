/* losses.c: not written yet */
