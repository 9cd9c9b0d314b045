#!/usr/bin/python3
"""Writes the small .npy fixtures of tests/data/npy with NumPy itself (Debian's python3-numpy), so
the reader is tested on what np.save really writes. Run: /usr/bin/python3 tests/gen_npy.py
Pixel (i, y, x[, c]) = (i*20 + y*5 + x + c*7) % 256; label i = (i * 3) % 5."""
import os
import numpy as np
from numpy.lib import format as npf

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "npy")
os.makedirs(out, exist_ok=True)
n, H, W = 6, 4, 5
i, y, x = np.meshgrid(np.arange(n), np.arange(H), np.arange(W), indexing="ij")
gray = ((i * 20 + y * 5 + x) % 256).astype(np.uint8)
rgb = np.stack([(i * 20 + y * 5 + x + c * 7) % 256 for c in range(3)], axis=-1).astype(np.uint8)
labels = (np.arange(n) * 3) % 5

np.save(os.path.join(out, "gray_u8.npy"), gray)                                  # (6, 4, 5) |u1
np.save(os.path.join(out, "rgb_f32.npy"), (rgb / 255.0).astype(np.float32))     # (6, 4, 5, 3) <f4
np.save(os.path.join(out, "labels_i64.npy"), labels.astype(np.int64))           # (6,) <i8
np.save(os.path.join(out, "labels_u1.npy"), labels.astype(np.uint8))            # (6,) |u1
np.save(os.path.join(out, "labels_i2.npy"), labels.astype(np.int16))            # (6,) <i2
with open(os.path.join(out, "gray_u8_v2.npy"), "wb") as f:                      # format 2.0
    npf.write_array(f, gray, version=(2, 0))
np.save(os.path.join(out, "fortran_u8.npy"), np.asfortranarray(gray))           # fortran_order
np.save(os.path.join(out, "gray_f8.npy"), gray.astype(np.float64))              # <f8: refused
np.save(os.path.join(out, "rgb_be_f4.npy"), (rgb / 255.0).astype(">f4"))       # >f4: refused
np.save(os.path.join(out, "chw_u8.npy"), rgb.transpose(0, 3, 1, 2).copy())      # N x C x H x W
np.save(os.path.join(out, "labels_neg.npy"), np.array([0, 1, -1, 2, 3, 4]))     # out of range
np.save(os.path.join(out, "labels_5.npy"), labels[:5].astype(np.int64))        # count mismatch
