// Attention of a few query tokens per sequence over each sequence's own cached keys, on the CPU.
// `kernels/cpu_attention.py` builds this file and says why it exists.
//
// attend(q [T, H, D], k [B, KVH, W, D], v [B, KVH, W, D], mask [B, M, W], q_starts [B + 1],
//        k_lengths [B], scale) -> [T, H, D]
// Sequence b's query tokens are q[q_starts[b] : q_starts[b + 1]]; its token j attends over keys
// [0, k_lengths[b]) of row b with the additive mask row mask[b, j]. Query head h reads key/value
// head h / (H / KVH). k, v and mask may be strided views (the slot cache's rows) whose last dimension
// is contiguous; q is contiguous. Scores, softmax and the weighted sum are computed in float32.
//
// Each query row is reduced in one fixed order: a score's dot product over the head dimension in
// lane order, the softmax denominator over keys in blocks of the vector width, the value sum key by
// key. A key the mask removes (score under e^-88 of the row's largest) adds exactly zero. So a row's
// output has the same bits whatever other rows, tokens or masked keys share the call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxDim = 256;  // the largest head dimension
constexpr int64_t kMaxChunks = kMaxDim / kLanes;

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline Vec load(const c10::Half* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline void store(float* p, const Vec& v) { v.store(p); }
template <typename T>
inline void store(T* p, const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<T>(lanes[i]);
}
inline float sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// Chunks > 0: the head dimension in vectors, known at compile time (64 and 128); 0: read at run time.
template <typename T, int64_t Chunks>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                 const at::Tensor& q_starts, const at::Tensor& k_lengths, double scale, at::Tensor& out) {
  const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t chunks = Chunks > 0 ? Chunks : dim / kLanes;
  constexpr int64_t kSlots = Chunks > 0 ? Chunks : kMaxChunks;  // a fixed count lets the compiler keep them in registers
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ms0 = mask.stride(0), ms1 = mask.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* mp = mask.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* lengths = k_lengths.data_ptr<int64_t>();
  const Vec vscale(static_cast<float>(scale));
  const Vec zero(0.f), underflow(-88.f);

  // One task per (sequence, key/value head): its query rows are the group's heads of its tokens.
  at::parallel_for(0, k.size(0) * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries, scores, values;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t first = starts[b], rows = (starts[b + 1] - first) * group, len = lengths[b];
      const int64_t padded = (len + kLanes - 1) / kLanes * kLanes;
      const T* kb = kp + b * ks0 + h * ks1;
      const T* vb = vp + b * vs0 + h * vs1;
      queries.resize(rows * dim);
      scores.resize(rows * padded);
      values.resize(len * dim);
      // row r is head h * group + r % group of token first + r / group, pre-scaled
      for (int64_t r = 0; r < rows; ++r) {
        const T* src = qp + ((first + r / group) * heads + h * group + r % group) * dim;
        for (int64_t c = 0; c < chunks; ++c) {
          (load(src + c * kLanes) * vscale).store(queries.data() + r * dim + c * kLanes);
        }
      }
      for (int64_t s = 0; s < len; ++s) {  // scores: each key read once for every row
        Vec row[kSlots];
        for (int64_t c = 0; c < chunks; ++c) row[c] = load(kb + s * ks2 + c * kLanes);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = queries.data() + r * dim;
          Vec dot = Vec::loadu(qr) * row[0];
          for (int64_t c = 1; c < chunks; ++c) dot = at::vec::fmadd(Vec::loadu(qr + c * kLanes), row[c], dot);
          scores[r * padded + s] = sum(dot);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax over the row's keys, padded to whole vectors
        const T* mr = mp + b * ms0 + (r / group) * ms1;
        float* sr = scores.data() + r * padded;
        Vec tops(-std::numeric_limits<float>::infinity());
        int64_t s = 0;
        for (; s + kLanes <= len; s += kLanes) {
          const Vec x = Vec::loadu(sr + s) + load(mr + s);
          x.store(sr + s);
          tops = at::vec::maximum(tops, x);
        }
        float top = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, tops);
        for (; s < len; ++s) {
          sr[s] += static_cast<float>(mr[s]);
          top = std::max(top, sr[s]);
        }
        for (; s < padded; ++s) sr[s] = -std::numeric_limits<float>::infinity();
        const Vec vtop(top);
        Vec total = zero;
        for (int64_t s = 0; s < padded; s += kLanes) {
          const Vec x = Vec::loadu(sr + s) - vtop;
          const Vec e = Vec::blendv(x.exp_u20(), zero, x < underflow);
          e.store(sr + s);
          total = total + e;
        }
        const Vec inverse(1.f / sum(total));
        for (int64_t s = 0; s < padded; s += kLanes) (Vec::loadu(sr + s) * inverse).store(sr + s);
      }
      for (int64_t s = 0; s < len; ++s) {  // values in float32, once for every row
        for (int64_t c = 0; c < chunks; ++c) load(vb + s * vs2 + c * kLanes).store(values.data() + s * dim + c * kLanes);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* sr = scores.data() + r * padded;
        Vec acc[kSlots];
        for (int64_t c = 0; c < chunks; ++c) acc[c] = zero;
        for (int64_t s = 0; s < len; ++s) {
          const Vec p(sr[s]);
          const float* vr = values.data() + s * dim;
          for (int64_t c = 0; c < chunks; ++c) acc[c] = at::vec::fmadd(p, Vec::loadu(vr + c * kLanes), acc[c]);
        }
        T* dst = op + ((first + r / group) * heads + h * group + r % group) * dim;
        for (int64_t c = 0; c < chunks; ++c) store(dst + c * kLanes, acc[c]);
      }
    }
  });
}

template <typename T>
void attend_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  const at::Tensor& q_starts, const at::Tensor& k_lengths, double scale, at::Tensor& out) {
  switch (q.size(2) / kLanes) {
    case 64 / kLanes: return attend_rows<T, 64 / kLanes>(q, k, v, mask, q_starts, k_lengths, scale, out);
    case 128 / kLanes: return attend_rows<T, 128 / kLanes>(q, k, v, mask, q_starts, k_lengths, scale, out);
    default: return attend_rows<T, 0>(q, k, v, mask, q_starts, k_lengths, scale, out);
  }
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  const at::Tensor& q_starts, const at::Tensor& k_lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 3, "attend: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(2) == 1,
              "attend: q contiguous, k / v / mask contiguous in their last dimension");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              mask.scalar_type() == q.scalar_type(), "attend: q, k, v and mask of one dtype");
  TORCH_CHECK(q.size(2) == k.size(3) && q.size(2) % kLanes == 0 && q.size(2) <= kMaxDim &&
              q.size(1) % k.size(1) == 0, "attend: head dimension or head count not supported");
  TORCH_CHECK(q_starts.scalar_type() == at::kLong && k_lengths.scalar_type() == at::kLong &&
              q_starts.numel() == k.size(0) + 1 && k_lengths.numel() == k.size(0) &&
              q_starts.is_contiguous() && k_lengths.is_contiguous(), "attend: bad q_starts / k_lengths");
  auto out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: attend_typed<float>(q, k, v, mask, q_starts, k_lengths, scale, out); break;
    case at::kBFloat16: attend_typed<c10::BFloat16>(q, k, v, mask, q_starts, k_lengths, scale, out); break;
    case at::kHalf: attend_typed<c10::Half>(q, k, v, mask, q_starts, k_lengths, scale, out); break;
    default: TORCH_CHECK(false, "attend: float32, bfloat16 or float16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(specserve_cpu, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor q_starts, Tensor k_lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(specserve_cpu, CPU, m) { m.impl("attend", &attend); }
