/* ema.c: the temporal mean of a parameter vector (pcl's peer mean teacher; run.ema_decay gives
   any method the same copy). */
#include <math.h>

#include "kdpeers/kd.h"

double kdp_ema_rate(double decay, int64_t t) {
  double a = 1.0 - 1.0 / ((double)t + 1.0);
  return a < decay ? a : decay;
}

void kdp_ema_update(float *ema, const float *theta, size_t n, double decay, int64_t t) {
  const double a = kdp_ema_rate(decay, t);
  const float af = (float)a, bf = (float)(1.0 - a);
  /* PyTorch: ema.mul_(a).add_(theta, alpha = 1 - a); its vectorised add is a fused multiply-add
     (theta * alpha + ema), so fmaf gives PyTorch's bits */
  for (size_t k = 0; k < n; k++) ema[k] = fmaf(bf, theta[k], ema[k] * af);
}
