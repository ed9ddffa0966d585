// Row kernels of the fused chunk-likelihood and shared-vocabulary ops (tide_ds.kernels).
//
// Each works on a block of logits z [rows, vocab], row-major and contiguous, in fp32, fp16 or
// bf16, with fp32 arithmetic; one thread block per row sweeps the vocabulary in tiles with online
// (max, sum) statistics, so no [rows, vocab] intermediate is ever stored besides z itself.
// Plain C++ interface (no torch headers): binding.cpp wraps it for PyTorch, and
// `nvcc -c tide_kernels.cu` compile-checks the kernels alone.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

enum TideDtype : int { kTideF32 = 0, kTideF16 = 1, kTideBF16 = 2 };

// lse[r] = logsumexp_j(scale * z[r, j]) (+inf if a logit is +inf, -inf if all are -inf);
// target_logit[r] = scale * z[r, targets[r]]. Targets must lie in [0, vocab) (binding.cpp checks
// before the launch; an unchecked caller gets NaN there, never another logit).
cudaError_t tide_lse_target(const void* z, int dtype, const int64_t* targets, int64_t rows, int64_t vocab,
                            float scale, float* lse, float* target_logit, cudaStream_t stream);

// In place: z[r, j] <- scale * (coef_prob[r] * exp(scale * z[r, j] - lse[r]) + coef_target[r] * [j == targets[r]]),
// the gradient of a loss of the target log-prob and log-normaliser w.r.t. the unscaled logits.
cudaError_t tide_logit_grad(void* z, int dtype, const int64_t* targets, int64_t rows, int64_t vocab, float scale,
                            const float* lse, const float* coef_target, const float* coef_prob, cudaStream_t stream);

// Per-row KL at temperature T = 1 / inv_temperature between student logits zs [rows, vocab_s] and
// teacher logits zt [rows, vocab] on the shared ids j < vocab (vocab <= vocab_s):
// lam == nullptr: KL(p_t || p_s), or KL(p_s || p_t) when reverse; lam[r]: KL(r || p_s) with
// r = softmax(((1 - lam) zs + lam zt) / T) held constant (TIDAL). Writes kl[r] and overwrites zs with
// coef[r] * dKL/dzs (0 for j >= vocab), plus, when coef_target != nullptr (then lse1 and targets too),
// coef_target[r] * ([j == targets[r]] - exp(zs[r, j] - lse1[r])): the gradient of a log-prob term.
cudaError_t tide_kl_grad(void* zs, int zs_dtype, int64_t vocab_s, const void* zt, int zt_dtype, int64_t rows,
                         int64_t vocab, float inv_temperature, const float* coef, const float* lam, int reverse,
                         const float* lse1, const int64_t* targets, const float* coef_target, float* kl,
                         cudaStream_t stream);
