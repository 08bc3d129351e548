// Decode attention over the recalled raw chunks of a chunk tier, read in place.
//
// One task per (batch row, KV head) runs an online softmax over its picked chunks. For each chunk
// it computes the logits of the G grouped queries against the chunk's valid tokens (and the
// chunk's gist), rescales the running sums when the max logit grows, and adds exp(logit - max)
// times each value row. Nothing is gathered into a copy, so each recalled key and value row is
// read from memory once. The G queries then reuse it from the L1 cache.
//
// Shapes:
//   grouped           (B, Hk, G, D) float32, already scaled
//   chunk_k, chunk_v  (B, Hk, N, Cm, D) float32
//   chunk_valid       (B, N, Cm) bool
//   index, picked     (B, Hk, K) int64 and bool
//   gist_k, gist_v    (B, Hk, N, D) float32, or empty tensors when gists are not attended
// Returns numer (B, Hk, G, D), top (B, Hk, G) and total (B, Hk, G) as in gsa.ops.recall.Partial.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace {

using namespace gsa_kernels;

// Picked chunks between the current one and the one prefetched. Distances of 2, 3 and 5 were no
// faster at 128K keys on a 2-core AMD EPYC machine.
constexpr int64_t kPrefetchDistance = 1;

// numer_g += sum_r weights[r * G + g] * v_r, two vectors of lanes at a time (2G chains).
template <int G>
void add_weighted_rows(const float* weights, const std::vector<const float*>& values, int64_t dim, float* numer) {
  const int64_t rows = static_cast<int64_t>(values.size()), body = dim - dim % (2 * kLanes);
  for (int64_t d = 0; d < body; d += 2 * kLanes) {
    vec acc0[G], acc1[G];
    for (int g = 0; g < G; ++g) {
      acc0[g] = load(numer + g * dim + d);
      acc1[g] = load(numer + g * dim + d + kLanes);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const vec x0 = load(values[r] + d), x1 = load(values[r] + d + kLanes);
      for (int g = 0; g < G; ++g) {
        acc0[g] += weights[r * G + g] * x0;
        acc1[g] += weights[r * G + g] * x1;
      }
    }
    for (int g = 0; g < G; ++g) {
      store(numer + g * dim + d, acc0[g]);
      store(numer + g * dim + d + kLanes, acc1[g]);
    }
  }
  for (int64_t d = body; d < dim; ++d)
    for (int64_t r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) numer[g * dim + d] += weights[r * G + g] * values[r][d];
}

// Fold one chunk's key and value rows into the running softmax of every grouped query.
// ``logits`` has room for (Cm + 1) * G floats rounded up to a multiple of kLanes.
template <int G>
void fold_rows(const HeadTask& t, const std::vector<const float*>& keys, const std::vector<const float*>& values,
               float* logits, const Ahead& ahead) {
  const int64_t rows = static_cast<int64_t>(keys.size());
  row_logits<G>(t.query, [&](int64_t r) { return keys[r]; }, rows, t.dim, logits, ahead);
  for (int g = 0; g < G; ++g) {
    float chunk_top = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) chunk_top = std::max(chunk_top, logits[r * G + g]);
    if (chunk_top > t.top[g]) {  // a larger max: rescale what was summed under the old one
      const float factor = std::exp(t.top[g] - chunk_top);  // 0 while top is still -inf
      for (int64_t d = 0; d < t.dim; ++d) t.numer[g * t.dim + d] *= factor;
      t.total[g] *= factor;
      t.top[g] = chunk_top;
    }
  }
  // The logits become softmax weights in place, one vector at a time.
  for (int64_t r = 0; r < rows; ++r)
    for (int g = 0; g < G; ++g) logits[r * G + g] -= t.top[g];
  for (int64_t i = 0; i < rows * G; i += kLanes) store(logits + i, exp_lanes(load(logits + i)));
  for (int64_t r = 0; r < rows; ++r)
    for (int g = 0; g < G; ++g) t.total[g] += logits[r * G + g];
  add_weighted_rows<G>(logits, values, t.dim, t.numer);
}

template <int G>
void attend_head(const HeadTask& t) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g) {
    t.top[g] = -inf;
    t.total[g] = 0.f;
  }
  std::fill(t.numer, t.numer + G * t.dim, 0.f);
  std::vector<const float*> keys, values;
  const int64_t rows = std::max(t.chunk_len + 1, t.sinks.count + t.recent.count);
  std::vector<float> logits((rows * G + kLanes - 1) / kLanes * kLanes);
  for (const DenseRows* part : {&t.sinks, &t.recent}) {
    for (int64_t r = 0; r < part->count; ++r) {
      if (!part->valid[r]) continue;
      keys.push_back(part->keys + r * t.dim);
      values.push_back(part->values + r * t.dim);
    }
  }
  if (!keys.empty()) fold_rows<G>(t, keys, values, logits.data(), Ahead());
  const int64_t chunk_floats = t.chunk_len * t.dim;
  for (int64_t slot = 0; slot < t.recalled; ++slot) {
    if (t.picked != nullptr && !t.picked[slot]) continue;
    Ahead ahead;
    for (int64_t next = slot + 1, seen = 0; next < t.recalled; ++next) {
      if ((t.picked != nullptr && !t.picked[next]) || ++seen < kPrefetchDistance) continue;
      ahead = {t.keys + t.index[next] * chunk_floats, t.values + t.index[next] * chunk_floats, t.chunk_len};
      break;
    }
    // The chunk's valid token rows, then its gist.
    const int64_t n = t.index[slot];
    keys.clear();
    values.clear();
    for (int64_t c = 0; c < t.chunk_len; ++c) {
      if (!t.valid[n * t.chunk_len + c]) continue;
      keys.push_back(t.keys + (n * t.chunk_len + c) * t.dim);
      values.push_back(t.values + (n * t.chunk_len + c) * t.dim);
    }
    if (t.gist_keys != nullptr) {
      keys.push_back(t.gist_keys + n * t.dim);
      values.push_back(t.gist_values + n * t.dim);
    }
    fold_rows<G>(t, keys, values, logits.data(), ahead);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recall_attention(
    const at::Tensor& grouped, const at::Tensor& chunk_k, const at::Tensor& chunk_v, const at::Tensor& chunk_valid,
    const at::Tensor& index, const at::Tensor& picked, const at::Tensor& gist_k, const at::Tensor& gist_v) {
  // The Python wrapper gives clearer messages for the same checks. These guard direct calls.
  check_recall_tensors(grouped, chunk_k, chunk_v, chunk_valid, gist_k, gist_v);
  const int64_t batch = grouped.size(0), kv_heads = grouped.size(1), group = grouped.size(2), dim = grouped.size(3);
  const int64_t num_chunks = chunk_k.size(2), chunk_len = chunk_k.size(3);
  const bool with_gists = gist_k.numel() > 0;
  TORCH_CHECK(index.dim() == 3 && index.size(0) == batch && index.size(1) == kv_heads &&
                  picked.sizes() == index.sizes() && index.is_contiguous() && picked.is_contiguous() &&
                  index.scalar_type() == at::kLong && picked.scalar_type() == at::kBool,
              "index and picked must be contiguous (B, Hk, K) int64 and bool tensors");
  const int64_t recalled = index.size(2);
  const int64_t* chunk_ids = index.data_ptr<int64_t>();
  const bool* chunk_picked = picked.data_ptr<bool>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(!chunk_picked[i] || (chunk_ids[i] >= 0 && chunk_ids[i] < num_chunks), "recalled chunk index ",
                chunk_ids[i], " is outside the tier's ", num_chunks, " chunks");
  }
  auto numer = at::empty({batch, kv_heads, group, dim}, grouped.options());
  auto top = at::empty({batch, kv_heads, group}, grouped.options());
  auto total = at::empty({batch, kv_heads, group}, grouped.options());

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads;
      HeadTask t{
          grouped.data_ptr<float>() + task * group * dim,
          chunk_k.data_ptr<float>() + task * num_chunks * chunk_len * dim,
          chunk_v.data_ptr<float>() + task * num_chunks * chunk_len * dim,
          chunk_valid.data_ptr<bool>() + b * num_chunks * chunk_len,
          index.data_ptr<int64_t>() + task * recalled,
          picked.data_ptr<bool>() + task * recalled,
          with_gists ? gist_k.data_ptr<float>() + task * num_chunks * dim : nullptr,
          with_gists ? gist_v.data_ptr<float>() + task * num_chunks * dim : nullptr,
          numer.data_ptr<float>() + task * group * dim,
          top.data_ptr<float>() + task * group,
          total.data_ptr<float>() + task * group,
          group, dim, chunk_len, recalled};
      run_task(t);
    }
  });
  return {numer, top, total};
}

}  // namespace

namespace gsa_kernels {

// Run a task in slices of at most kMaxGroup query heads, each with the pass unrolled for its size.
void run_task(const HeadTask& task) {
  for (int64_t first = 0; first < task.group; first += kMaxGroup) {
    HeadTask t = task;
    t.group = std::min(kMaxGroup, task.group - first);
    t.query += first * t.dim;
    t.numer += first * t.dim;
    t.top += first;
    t.total += first;
    switch (t.group) {
      case 1: attend_head<1>(t); break;
      case 2: attend_head<2>(t); break;
      case 3: attend_head<3>(t); break;
      case 4: attend_head<4>(t); break;
      case 5: attend_head<5>(t); break;
      case 6: attend_head<6>(t); break;
      case 7: attend_head<7>(t); break;
      default: attend_head<8>(t); break;
    }
  }
}

void check_recall_tensors(const at::Tensor& grouped, const at::Tensor& chunk_k, const at::Tensor& chunk_v,
                          const at::Tensor& chunk_valid, const at::Tensor& gist_k, const at::Tensor& gist_v) {
  TORCH_CHECK(grouped.dim() == 4 && chunk_k.dim() == 5, "the recall kernel takes (B, Hk, G, D) queries and "
              "(B, Hk, N, Cm, D) chunks");
  const int64_t batch = grouped.size(0), kv_heads = grouped.size(1), dim = grouped.size(3);
  const int64_t num_chunks = chunk_k.size(2), chunk_len = chunk_k.size(3);
  const bool with_gists = gist_k.numel() > 0;
  TORCH_CHECK(chunk_k.sizes() == at::IntArrayRef({batch, kv_heads, num_chunks, chunk_len, dim}) &&
                  chunk_v.sizes() == chunk_k.sizes(), "chunk_k and chunk_v must be (B, Hk, N, Cm, D) with the "
              "queries' B, Hk and D");
  TORCH_CHECK(chunk_valid.sizes() == at::IntArrayRef({batch, num_chunks, chunk_len}), "chunk_valid must be (B, N, Cm)");
  TORCH_CHECK(!with_gists || (gist_k.sizes() == at::IntArrayRef({batch, kv_heads, num_chunks, dim}) &&
                              gist_v.sizes() == gist_k.sizes()), "gist_k and gist_v must be (B, Hk, N, D)");
  TORCH_CHECK(grouped.is_contiguous() && chunk_k.is_contiguous() && chunk_v.is_contiguous() &&
                  chunk_valid.is_contiguous() && gist_k.is_contiguous() && gist_v.is_contiguous(),
              "the recall kernel takes contiguous tensors");
  TORCH_CHECK(grouped.scalar_type() == at::kFloat && chunk_k.scalar_type() == at::kFloat &&
                  chunk_v.scalar_type() == at::kFloat && chunk_valid.scalar_type() == at::kBool &&
                  (!with_gists || (gist_k.scalar_type() == at::kFloat && gist_v.scalar_type() == at::kFloat)),
              "the recall kernel takes float32 queries, chunks and gists and a bool chunk_valid");
}

}  // namespace gsa_kernels

TORCH_LIBRARY(gsa_cpu, m) {
  m.def("recall_attention(Tensor grouped, Tensor chunk_k, Tensor chunk_v, Tensor chunk_valid, Tensor index, "
        "Tensor picked, Tensor gist_k, Tensor gist_v) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gsa_cpu, CPU, m) { m.impl("recall_attention", &recall_attention); }
