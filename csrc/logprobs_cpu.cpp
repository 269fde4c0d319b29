// Fused log-prob + entropy of target tokens on CPU, forward and backward, vocab-tiled.
//
// Matches kernels/logprobs.py (`logprobs_chunked`, the torch twin): z = hidden @ weight.T * inv_temp (fp32),
// logp = z[target] - lse, entropy = lse - sum softmax(z) * z. Each [BN, BV] logits tile is produced by one small
// GEMM (ATen -> MKL/oneDNN) and then reduced in ONE fused pass while it is still in L2: max, exp, sum, sum e*z,
// target pick (forward) or softmax + dz + GEMMs into dhidden/dweight (backward).
// Forward is parallel over row blocks. Backward is parallel over vocab tiles: each thread owns a disjoint slice of
// dweight and a private fp32 dhidden, summed at the end (threads x N x H x 4 bytes extra).
// Stored logits (optional): given a [N, V] fp32 buffer, the forward writes every scaled logits tile into it, and
// the backward given the same buffer reads z from it instead of recomputing h @ w.T, one of its three GEMMs. The
// caller owns the buffer (kernels/native.py reuses one: fresh pages cost more than the GEMM saved). Given an empty
// tensor, no [N, V] buffer exists. Results are the same either way (the stored tile is the one the forward reduced).
// fp32 only (the CPU training dtype this op was measured for); bf16 callers use the twin.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace fast_srt {

namespace {
// Tile sizes chosen by measurement (bench/results/trainer_cpu_2026-11-30.md). Fewer rows per tile when N is
// small, so that every thread still gets a row block in the forward.
constexpr int64_t kFwdBlockNMax = 256;
constexpr int64_t kFwdBlockNMin = 64;
constexpr int64_t kFwdBlockV = 512;  // 256 x 512 fp32 = 512 KiB: stays in L2
constexpr int64_t kBwdBlockN = 128;
constexpr int64_t kBwdBlockV = 256;  // dweight slice 256 x H stays hot across row blocks

int64_t forward_block_rows(int64_t N) {
  const int64_t per_thread = (N + at::get_num_threads() - 1) / std::max(1, at::get_num_threads());
  return std::clamp<int64_t>(per_thread, kFwdBlockNMin, kFwdBlockNMax);
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "hidden and weight disagree on H");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [N]");
  TORCH_CHECK_VALUE(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                    "fast_srt native logprobs: fp32 hidden and weight only");
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
                    "fast_srt native logprobs: CPU tensors only");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(const at::Tensor& hidden_in,
                                                                        const at::Tensor& weight_in,
                                                                        const at::Tensor& targets_in,
                                                                        double inv_temp,
                                                                        const at::Tensor& logits_out) {
  check_inputs(hidden_in, weight_in, targets_in);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(),
                   targets = targets_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), entropy = at::empty({N}, opts), lse = at::empty({N}, opts),
             mu = at::empty({N}, opts);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  float *logp_p = logp.data_ptr<float>(), *ent_p = entropy.data_ptr<float>(), *lse_p = lse.data_ptr<float>(),
        *mu_p = mu.data_ptr<float>();
  const float scale = static_cast<float>(inv_temp);
  const int64_t BN = forward_block_rows(N);
  const int64_t n_blocks = (N + BN - 1) / BN;
  const bool store_logits = logits_out.numel() > 0;
  TORCH_CHECK_VALUE(!store_logits || (logits_out.dim() == 2 && logits_out.size(0) == N && logits_out.size(1) == V &&
                                      logits_out.scalar_type() == at::kFloat && logits_out.is_contiguous()),
                    "logits_out must be a contiguous fp32 [N, V] tensor (or empty)");

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({BN, kFwdBlockV}, opts);  // (BN, BV) logits, reused for every tile
    std::vector<float> m(BN), s(BN), t(BN), zt(BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * BN, rn = std::min(BN, N - r0);
      at::Tensor h = hidden.narrow(0, r0, rn);
      std::fill(m.begin(), m.end(), -1e30f);  // finite: built with -ffast-math
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(t.begin(), t.end(), 0.f);
      std::fill(zt.begin(), zt.end(), 0.f);
      for (int64_t v0 = 0; v0 < V; v0 += kFwdBlockV) {
        const int64_t vn = std::min(kFwdBlockV, V - v0);
        at::Tensor z = store_logits ? logits_out.narrow(0, r0, rn).narrow(1, v0, vn)  // into the kept buffer
                                    : tile.narrow(0, 0, rn).narrow(1, 0, vn);
        at::mm_out(z, h, weight.narrow(0, v0, vn).t());
        const int64_t ld = z.stride(0);
        float* zp = z.data_ptr<float>();
        for (int64_t i = 0; i < rn; ++i) {
          float* row = zp + i * ld;
          float tmax = -1e30f;
#pragma omp simd reduction(max : tmax)
          for (int64_t j = 0; j < vn; ++j) {
            row[j] *= scale;
            tmax = std::max(tmax, row[j]);
          }
          const float m_new = std::max(m[i], tmax);
          const float alpha = std::exp(m[i] - m_new);  // 0 on the first tile
          float se = 0.f, sez = 0.f;
#pragma omp simd reduction(+ : se, sez)
          for (int64_t j = 0; j < vn; ++j) {
            const float d = row[j] - m_new;
            const float e = std::exp(d);
            se += e;
            sez += e * d;
          }
          // t = sum e * (z - m): rescale the old part to the new max
          t[i] = (s[i] > 0.f ? alpha * (t[i] + s[i] * (m[i] - m_new)) : 0.f) + sez;
          s[i] = alpha * s[i] + se;
          m[i] = m_new;
          const int64_t y = tgt[r0 + i] - v0;
          if (y >= 0 && y < vn) zt[i] = row[y];
        }
      }
      for (int64_t i = 0; i < rn; ++i) {
        const float log_s = std::log(s[i]);
        lse_p[r0 + i] = m[i] + log_s;
        mu_p[r0 + i] = m[i] + t[i] / s[i];
        logp_p[r0 + i] = zt[i] - m[i] - log_s;
        ent_p[r0 + i] = log_s - t[i] / s[i];
      }
    }
  });
  return {logp, entropy, lse, mu};
}

std::tuple<at::Tensor, at::Tensor> logprobs_bwd(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                const at::Tensor& mu_in, const at::Tensor& g_logp_in,
                                                const at::Tensor& g_ent_in, double inv_temp,
                                                const at::Tensor& logits) {
  check_inputs(hidden_in, weight_in, targets_in);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(),
                   targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous(), mu = mu_in.contiguous(), g_logp = g_logp_in.contiguous(),
                   g_ent = g_ent_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  for (const at::Tensor* x : {&lse, &mu, &g_logp, &g_ent}) {
    TORCH_CHECK_VALUE(x->dim() == 1 && x->size(0) == N && x->scalar_type() == at::kFloat,
                      "lse, mu and the output grads must be fp32 [N]");
  }
  const bool stored = logits.numel() > 0;
  TORCH_CHECK_VALUE(!stored || (logits.dim() == 2 && logits.size(0) == N && logits.size(1) == V &&
                                logits.scalar_type() == at::kFloat && logits.is_contiguous()),
                    "stored logits must be the forward's contiguous fp32 [N, V] buffer");
  auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor dweight = at::zeros({V, H}, opts);
  const int nthreads = at::get_num_threads();
  at::Tensor dhidden_local = at::zeros({nthreads, N, H}, opts);  // private dhidden per thread
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const float *lse_p = lse.data_ptr<float>(), *mu_p = mu.data_ptr<float>(), *gl_p = g_logp.data_ptr<float>(),
              *ge_p = g_ent.data_ptr<float>();
  const float scale = static_cast<float>(inv_temp);
  const int64_t n_vtiles = (V + kBwdBlockV - 1) / kBwdBlockV;

  at::parallel_for(0, n_vtiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor dh = dhidden_local[at::get_thread_num()];
    at::Tensor tile = at::empty({kBwdBlockN, kBwdBlockV}, opts);
    for (int64_t vt = t0; vt < t1; ++vt) {
      const int64_t v0 = vt * kBwdBlockV, vn = std::min(kBwdBlockV, V - v0);
      at::Tensor w = weight.narrow(0, v0, vn);
      at::Tensor dw = dweight.narrow(0, v0, vn);
      for (int64_t r0 = 0; r0 < N; r0 += kBwdBlockN) {
        const int64_t rn = std::min(kBwdBlockN, N - r0);
        at::Tensor h = hidden.narrow(0, r0, rn);
        at::Tensor z = tile.narrow(0, 0, rn).narrow(1, 0, vn);
        // the scaled logits: read from the forward's buffer (already scaled), else recomputed (then scaled below)
        const float* src = nullptr;
        int64_t ld_src = 0;
        float src_scale = 1.f;
        if (stored) {
          src = logits.data_ptr<float>() + r0 * V + v0;
          ld_src = V;
        } else {
          at::mm_out(z, h, w.t());
          src = z.data_ptr<float>();
          ld_src = z.stride(0);
          src_scale = scale;
        }
        const int64_t ld = z.stride(0);
        float* zp = z.data_ptr<float>();
        for (int64_t i = 0; i < rn; ++i) {
          float* row = zp + i * ld;
          const float* in = src + i * ld_src;
          const int64_t r = r0 + i;
          const float l = lse_p[r], m = mu_p[r], gl = gl_p[r], ge = ge_p[r];
          // dz = (-p * (g_logp + g_ent * (z - mu)) + g_logp * onehot) * inv_temp
#pragma omp simd
          for (int64_t j = 0; j < vn; ++j) {
            const float zz = in[j] * src_scale;
            const float p = std::exp(zz - l);
            row[j] = -p * (gl + ge * (zz - m)) * scale;
          }
          const int64_t y = tgt[r] - v0;
          if (y >= 0 && y < vn) row[y] += gl * scale;
        }
        dw.addmm_(z.t(), h);                        // (BV, H) += dz.T @ h
        auto dh_rows = dh.narrow(0, r0, rn);
        dh_rows.addmm_(z, w);                       // (BN, H) += dz @ w
      }
    }
  });
  at::Tensor dhidden = dhidden_local.sum(0);
  return {dhidden, dweight};
}

}  // namespace fast_srt
