// One decode step's attention on the CPU: every row has one query token, float32, keys and values
// in the KV cache's own layout [B, Hkv, S, D] (last dimension contiguous, any row/head/column
// strides: the slab cache's views), an optional boolean padding mask [B, S] (true: attend).
// Each (row, head) is one task: its keys are read once, scored, soft-maxed and its values summed,
// streaming the cache in order (worker/decode_attention.py says why and what it measured).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.dim() == 4, "query [B, H, D], key/value [B, Hkv, S, D]");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat &&
              value.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "key/value: last dimension contiguous");
  const at::Tensor q = query.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hk = key.size(1), S = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && key.size(3) == D && value.size(3) == D &&
              value.size(1) == Hk && value.size(2) == S && Hk > 0 && H % Hk == 0, "shapes do not match");
  const int64_t G = H / Hk;
  const bool* mp = nullptr;
  int64_t mb = 0, ms = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B &&
                mask->size(1) == S, "mask: bool [B, S]");
    mp = mask->data_ptr<bool>();
    mb = mask->stride(0);
    ms = mask->stride(1);
  }
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = key.stride(0), kh = key.stride(1), ks = key.stride(2);
  const int64_t vb = value.stride(0), vh = value.stride(1), vs = value.stride(2);
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    std::vector<float> acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, hk = h / G;
      const float* qi = qp + i * D;
      const float* krows = kp + b * kb + hk * kh;
      const float* vrows = vp + b * vb + hk * vh;
      float top = neg_inf;
      for (int64_t s = 0; s < S; ++s) {
        if (mp != nullptr && !mp[b * mb + s * ms]) {
          scores[s] = neg_inf;
          continue;
        }
        const float* kr = krows + s * ks;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * kr[d];
        dot *= sc;
        scores[s] = dot;
        top = dot > top ? dot : top;
      }
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float e = scores[s] == neg_inf ? 0.f : std::exp(scores[s] - top);
        scores[s] = e;
        sum += e;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float p = scores[s];
        if (p == 0.f) continue;
        const float* vr = vrows + s * vs;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
      }
      float* o = op + i * D;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(batchfarm, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(batchfarm, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
