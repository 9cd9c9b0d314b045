/* batcher.c: not written yet */
