// CUDA row kernels of the fused chunk-likelihood and shared-vocabulary ops; see tide_kernels.h.
// The PyTorch twin of every kernel is in tide_ds/kernels/twin.py (same arguments, same results).
#include "tide_kernels.h"
#include "tide_lse.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <climits>
#include <type_traits>

namespace {

// Threads per row; the row is swept in tiles of kThreads elements. Every kernel is launched with
// exactly kThreads threads (launch() below) and strides and reduces by it: whole warps (the
// shuffles use a full mask), at most the 1024 threads of a block.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kThreads % 32 == 0 && kThreads >= 32 && kThreads <= 1024,
              "kThreads must be a whole number of warps, at most 1024");

template <typename T>
__device__ __forceinline__ float load(const T* p);
template <>
__device__ __forceinline__ float load<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ void store(T* p, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ Lse shfl_xor(Lse v, int lane_mask) {
  return {__shfl_xor_sync(kFullMask, v.m, lane_mask), __shfl_xor_sync(kFullMask, v.s, lane_mask)};
}

struct Sum {
  float v;

  __device__ __forceinline__ static Sum merge(Sum a, Sum b) { return {a.v + b.v}; }
};

__device__ __forceinline__ Sum shfl_xor(Sum v, int lane_mask) { return {__shfl_xor_sync(kFullMask, v.v, lane_mask)}; }

// Reduces one value per thread over the whole thread block (blockDim.x == kThreads, checked by
// launch()); every thread gets the result. scratch holds kWarps values and may be reused by the
// next call.
template <typename S>
__device__ __forceinline__ S block_reduce(S v, S* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v = S::merge(v, shfl_xor(v, offset));
  __syncthreads();  // a previous reduction may still be reading scratch
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  S r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = S::merge(r, scratch[w]);
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lse_target_kernel(const T* __restrict__ z, const int64_t* __restrict__ targets, int64_t vocab, float scale,
                  float* __restrict__ lse, float* __restrict__ target_logit) {
  __shared__ Lse scratch[kWarps];
  const int64_t row = blockIdx.x;
  const T* zr = z + row * vocab;
  Lse acc{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) acc.add(load(zr + j) * scale);
  acc = block_reduce(acc, scratch);
  if (threadIdx.x == 0) {
    const int64_t t = targets[row];
    lse[row] = acc.value();
    target_logit[row] = (t >= 0 && t < vocab) ? load(zr + t) * scale : NAN;  // the binding refuses it first
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
logit_grad_kernel(T* __restrict__ z, const int64_t* __restrict__ targets, int64_t vocab, float scale,
                  const float* __restrict__ lse, const float* __restrict__ coef_target,
                  const float* __restrict__ coef_prob) {
  const int64_t row = blockIdx.x;
  T* zr = z + row * vocab;
  const float l = lse[row];
  const float cp = coef_prob[row] * scale;
  const float ct = coef_target[row] * scale;
  const int64_t t = targets[row];
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    float g = cp * expf(load(zr + j) * scale - l);
    if (j == t) g += ct;
    store(zr + j, g);
  }
}

// Student a = zs / T, teacher c = zt / T, on the shared ids j < vocab; the other side of the KL:
// d = c, or with TIDAL d = (1 - lam) a + lam c. Pass 1: log-normalisers of a and d. Pass 2: the
// KL sum (p log p - p log q per element, as the reference) and, for the forward KL / TIDAL, the
// gradient p_s - p_d. Reverse KL needs the row's KL in its gradient p_s (log p_s - log p_t - KL),
// so it writes in a third pass. The student row may be wider (vocab_s >= vocab): the KL gradient is
// 0 there. With coef_target, every element also gets the gradient of coef_target * log p(target)
// at temperature 1: coef_target * ([j == target] - exp(zs - lse1)).
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
kl_grad_kernel(TS* __restrict__ zs, int64_t vocab_s, const TT* __restrict__ zt, int64_t vocab, float inv_t,
               const float* __restrict__ coef, const float* __restrict__ lam, int reverse,
               const float* __restrict__ lse1, const int64_t* __restrict__ targets,
               const float* __restrict__ coef_target, float* __restrict__ kl_out) {
  __shared__ Lse lse_scratch[kWarps];
  __shared__ Sum sum_scratch[kWarps];
  const int64_t row = blockIdx.x;
  TS* zsr = zs + row * vocab_s;
  const TT* ztr = zt + row * vocab;
  const bool tidal = lam != nullptr && !reverse;
  const float mix = tidal ? lam[row] : 1.f;
  auto target = [&](float a, float c) { return tidal ? (1.f - mix) * a + mix * c : c; };
  const bool with_logp = coef_target != nullptr;
  const float ct = with_logp ? coef_target[row] : 0.f, l1 = with_logp ? lse1[row] : 0.f;
  const int64_t tgt = with_logp ? targets[row] : -1;
  auto logp_grad = [&](int64_t j, float z) { return with_logp ? ct * ((j == tgt ? 1.f : 0.f) - expf(z - l1)) : 0.f; };

  Lse acc_s{-INFINITY, 0.f}, acc_d{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float a = load(zsr + j) * inv_t, c = load(ztr + j) * inv_t;
    acc_s.add(a);
    acc_d.add(target(a, c));
  }
  const float lse_s = block_reduce(acc_s, lse_scratch).value();
  const float lse_d = block_reduce(acc_d, lse_scratch).value();
  const float g = coef[row] * inv_t;

  Sum kl{0.f};
  for (int64_t j = threadIdx.x; j < vocab_s; j += kThreads) {
    const float z = load(zsr + j);
    float grad = 0.f;
    if (j < vocab) {
      const float a = z * inv_t, c = load(ztr + j) * inv_t;
      const float log_s = a - lse_s, log_d = target(a, c) - lse_d;
      const float p_s = expf(log_s), p_d = expf(log_d);
      if (reverse) {
        if (p_s > 0.f) kl.v += p_s * (log_s - log_d);
      } else {
        if (p_d > 0.f) kl.v += p_d * (log_d - log_s);
        grad = g * (p_s - p_d);
      }
    }
    if (!reverse) store(zsr + j, grad + logp_grad(j, z));
  }
  kl = block_reduce(kl, sum_scratch);
  if (reverse) {
    for (int64_t j = threadIdx.x; j < vocab_s; j += kThreads) {
      const float z = load(zsr + j);
      float grad = 0.f;
      if (j < vocab) {
        const float log_s = z * inv_t - lse_s, log_t = load(ztr + j) * inv_t - lse_d;
        const float p_s = expf(log_s);  // p_s = 0 (a -inf logit): the limit 0, not 0 * (-inf - log_t) = NaN
        if (p_s > 0.f) grad = g * p_s * (log_s - log_t - kl.v);
      }
      store(zsr + j, grad + logp_grad(j, z));
    }
  }
  if (threadIdx.x == 0) kl_out[row] = kl.v;
}

// One thread block of kThreads per row; a grid has at most 2^31 - 1 blocks.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t rows, cudaStream_t stream, Args... args) {
  if (rows > INT_MAX) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream>>>(args...);
  return cudaGetLastError();
}

// Calls launch with a null T* for the logits' element type T; an unknown dtype is refused.
template <typename F>
cudaError_t dispatch(int dtype, F&& launch) {
  switch (dtype) {
    case kTideF32: return launch(static_cast<float*>(nullptr));
    case kTideF16: return launch(static_cast<__half*>(nullptr));
    case kTideBF16: return launch(static_cast<__nv_bfloat16*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t tide_lse_target(const void* z, int dtype, const int64_t* targets, int64_t rows, int64_t vocab,
                            float scale, float* lse, float* target_logit, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    return launch(lse_target_kernel<T>, rows, stream, static_cast<const T*>(z), targets, vocab, scale, lse,
                  target_logit);
  });
}

cudaError_t tide_logit_grad(void* z, int dtype, const int64_t* targets, int64_t rows, int64_t vocab, float scale,
                            const float* lse, const float* coef_target, const float* coef_prob, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    return launch(logit_grad_kernel<T>, rows, stream, static_cast<T*>(z), targets, vocab, scale, lse, coef_target,
                  coef_prob);
  });
}

cudaError_t tide_kl_grad(void* zs, int zs_dtype, int64_t vocab_s, const void* zt, int zt_dtype, int64_t rows,
                         int64_t vocab, float inv_temperature, const float* coef, const float* lam, int reverse,
                         const float* lse1, const int64_t* targets, const float* coef_target, float* kl,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (vocab > vocab_s || (coef_target != nullptr && (lse1 == nullptr || targets == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return dispatch(zs_dtype, [&](auto* s_tag) {
    using TS = typename std::remove_pointer<decltype(s_tag)>::type;
    return dispatch(zt_dtype, [&](auto* t_tag) {
      using TT = typename std::remove_pointer<decltype(t_tag)>::type;
      return launch(kl_grad_kernel<TS, TT>, rows, stream, static_cast<TS*>(zs), vocab_s, static_cast<const TT*>(zt),
                    vocab, inv_temperature, coef, lam, reverse, lse1, targets, coef_target, kl);
    });
  });
}
