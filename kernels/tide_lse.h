// The running log-sum-exp of the row kernels (tide_kernels.cu), in a header that also compiles as
// plain host C++ (g++), so its edge cases (+inf, -inf, NaN, empty) are tested without a GPU
// (tests/test_kernels.py::test_lse_merge_on_host) against torch.logsumexp.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define TIDE_HD __host__ __device__ __forceinline__
#else
#define TIDE_HD inline
#endif

// exp(from - to) for from <= to, exactly 1 when they are equal: +inf - +inf (and -inf - -inf)
// would be NaN, while a value equal to the running maximum contributes exp(0) = 1.
TIDE_HD float tide_rescale(float from, float to) { return from == to ? 1.f : expf(from - to); }

// Running log-sum-exp: m = largest value seen, s = sum of exp(x - m). Empty: m = -inf, s = 0.
// Matches torch.logsumexp: +inf if any value is +inf, -inf when empty or all -inf, NaN with a NaN.
struct Lse {
  float m, s;

  TIDE_HD void add(float x) {
    if (x == -INFINITY) return;  // exp(-inf) adds nothing
    if (x > m) {
      s = s * tide_rescale(m, x) + 1.f;
      m = x;
    } else {
      s += tide_rescale(x, m);  // NaN x: x > m is false, and exp(NaN) makes s NaN
    }
  }
  TIDE_HD static Lse merge(Lse a, Lse b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return a.s != a.s ? a : b;  // both empty (or NaN only): keep a NaN
    return {m, a.s * tide_rescale(a.m, m) + b.s * tide_rescale(b.m, m)};
  }
  TIDE_HD float value() const { return m + logf(s); }  // -inf when empty, +inf with a +inf
};
