// Top-k chunk selection of a decode step, producing the recalled chunk list directly.
//
// One task per (batch row, KV head) scores the candidate chunks for each of its G query heads, or
// takes scores computed elsewhere. It keeps the k best per head and merges the heads' choices.
// Then it adds the local-window chunks and writes the chosen chunks in ascending order. Scores
// stay in a per-thread buffer, so no (B, Hk, G, N) mask is built, and the list is what
// ``recall_attention`` reads.
//
// Candidates of row b are the valid chunks n < window_start[b]. Chunks n >= window_start[b] that
// are valid are always chosen. A head keeps its k[b] candidates of highest finite score, ties going
// to the lower chunk index. With ``group_sum`` the heads' scores are summed first and one choice of
// k[b] is made per KV head, otherwise the heads' choices are merged by union.
//
// Shapes:
//   grouped       (B, Hk, G, D) float32 queries, already scaled     (gist_top_chunks)
//   gist_k        (B, Hk, N, D) float32 level-1 gist keys           (gist_top_chunks)
//   scores        (B, Hk, G, N) float32 scores of any method        (top_chunks)
//   gist_valid    (B, N) bool
//   window_start  (B,) int64, first chunk of the local window
//   k             (B,) int64, chunks kept per head
// Returns index (B, Hk, K) int64, the chosen chunks in ascending order padded with chunk 0, and
// picked (B, Hk, K) bool, false on the padding. K is the largest count over rows and KV heads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace {

using namespace gsa_kernels;

// A candidate as one integer that orders like (score, then the lower chunk index): the float's
// bits made order-preserving in the high half, the complement of the chunk index in the low half.
// Integer comparisons keep the selection's inner loop short and free of unpredictable branches.
typedef uint64_t Ranked;

inline Ranked rank_key(float score, int64_t chunk) {
  if (score == 0.f) score = 0.f;  // -0 and +0 tie, as they compare equal
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<Ranked>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(chunk));
}

inline int64_t ranked_chunk(Ranked key) { return static_cast<uint32_t>(~static_cast<uint32_t>(key)); }

// Mark in ``chosen`` the row's k candidates of highest finite score, where chunk n scores
// scores[n * stride]. Candidates that rank above the current k-th best go to ``best``, which is
// cut back to the k best whenever it contains 4k, so most candidates cost one comparison.
void mark_top(const float* scores, int64_t stride, const RowChoice& row, std::vector<Ranked>& best,
              std::vector<uint8_t>& chosen) {
  best.clear();
  const int64_t end = row.candidate_end();
  if (row.k <= 0 || end == 0) return;
  const size_t k = static_cast<size_t>(std::min(row.k, end));  // also keeps 4 * k from overflowing
  const auto keep_best = [&] {
    std::nth_element(best.begin(), best.begin() + (k - 1), best.end(), std::greater<Ranked>());
    best.resize(k);
  };
  Ranked threshold = 0;  // the k-th best once k are kept; every finite score ranks above 0
  for (int64_t n = 0; n < end; ++n) {
    const float score = scores[n * stride];
    if (!std::isfinite(score) || !row.valid[n]) continue;
    const Ranked key = rank_key(score, n);
    if (key <= threshold) continue;
    best.push_back(key);
    if (best.size() == 4 * k) {
      keep_best();
      threshold = *std::min_element(best.begin(), best.end());
    }
  }
  if (best.size() > k) keep_best();
  for (const Ranked key : best) chosen[ranked_chunk(key)] = 1;
}

// Add the valid window chunks to ``chosen`` and return every chosen chunk in ascending order.
std::vector<int64_t> chosen_list(const RowChoice& row, std::vector<uint8_t>& chosen) {
  for (int64_t n = std::max<int64_t>(row.window_start, 0); n < row.num_chunks; ++n)
    if (row.valid[n]) chosen[n] = 1;
  std::vector<int64_t> list;
  for (int64_t n = 0; n < row.num_chunks; ++n)
    if (chosen[n]) list.push_back(n);
  return list;
}

// Choose from head-major scores, scores[g * num_chunks + n] for G heads.
std::vector<int64_t> choose(const float* scores, int64_t group, const RowChoice& row, bool group_sum) {
  std::vector<uint8_t> chosen(row.num_chunks, 0);
  std::vector<Ranked> best;
  if (group_sum) {
    std::vector<float> summed(row.candidate_end(), 0.f);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t n = 0; n < row.candidate_end(); ++n) summed[n] += scores[g * row.num_chunks + n];
    mark_top(summed.data(), 1, row, best, chosen);
  } else {
    for (int64_t g = 0; g < group; ++g) mark_top(scores + g * row.num_chunks, 1, row, best, chosen);
  }
  return chosen_list(row, chosen);
}

// Gist rows scored per call of row_logits, which prefetches the next block meanwhile.
constexpr int64_t kScoreBlock = 64;

template <int G>
void score_rows(const float* query, const float* gists, int64_t count, int64_t dim, float* logits) {
  for (int64_t first = 0; first < count; first += kScoreBlock) {
    const float* block = gists + first * dim;
    const int64_t rows = std::min(kScoreBlock, count - first);
    const int64_t next = std::min(kScoreBlock, std::max<int64_t>(count - first - rows, 0));
    const Ahead ahead{next > 0 ? block + rows * dim : nullptr, nullptr, next};
    row_logits<G>(query, [&](int64_t n) { return block + n * dim; }, rows, dim, logits + first * G, ahead);
  }
}

// Scores of G <= kMaxGroup queries against the first ``count`` gists, laid out as logits[n * G + g].
void score_slice(const float* query, const float* gists, int64_t group, int64_t count, int64_t dim, float* logits) {
  switch (group) {
    case 1: score_rows<1>(query, gists, count, dim, logits); break;
    case 2: score_rows<2>(query, gists, count, dim, logits); break;
    case 3: score_rows<3>(query, gists, count, dim, logits); break;
    case 4: score_rows<4>(query, gists, count, dim, logits); break;
    case 5: score_rows<5>(query, gists, count, dim, logits); break;
    case 6: score_rows<6>(query, gists, count, dim, logits); break;
    case 7: score_rows<7>(query, gists, count, dim, logits); break;
    default: score_rows<8>(query, gists, count, dim, logits); break;
  }
}

void check_rows(const at::Tensor& gist_valid, const at::Tensor& window_start, const at::Tensor& k, int64_t batch,
                int64_t num_chunks) {
  TORCH_CHECK(gist_valid.sizes() == at::IntArrayRef({batch, num_chunks}) && gist_valid.scalar_type() == at::kBool &&
                  gist_valid.is_contiguous(), "gist_valid must be a contiguous (B, N) bool tensor");
  TORCH_CHECK(window_start.sizes() == at::IntArrayRef({batch}) && k.sizes() == at::IntArrayRef({batch}) &&
                  window_start.scalar_type() == at::kLong && k.scalar_type() == at::kLong &&
                  window_start.is_contiguous() && k.is_contiguous(), "window_start and k must be (B,) int64 tensors");
  TORCH_CHECK(num_chunks < (int64_t{1} << 32), "the selection kernel takes fewer than 2^32 chunks, got ",
              num_chunks);
}

// Run ``task_choice(task, row)`` for every (batch row, KV head) and return the chosen lists.
template <typename TaskChoice>
std::vector<std::vector<int64_t>> choose_all(int64_t batch, int64_t kv_heads, const at::Tensor& gist_valid,
                                             const at::Tensor& window_start, const at::Tensor& k,
                                             const TaskChoice& task_choice) {
  const int64_t num_chunks = gist_valid.size(1);
  std::vector<std::vector<int64_t>> lists(batch * kv_heads);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads;
      const RowChoice row{gist_valid.data_ptr<bool>() + b * num_chunks, num_chunks,
                          window_start.data_ptr<int64_t>()[b], k.data_ptr<int64_t>()[b]};
      lists[task] = task_choice(task, row);
    }
  });
  return lists;
}

// Pack one list per (batch row, KV head) into (index, picked), both (B, Hk, K).
std::tuple<at::Tensor, at::Tensor> pack_lists(const std::vector<std::vector<int64_t>>& lists, int64_t batch,
                                              int64_t kv_heads) {
  int64_t width = 0;
  for (const auto& list : lists) width = std::max<int64_t>(width, static_cast<int64_t>(list.size()));
  auto index = at::zeros({batch, kv_heads, width}, at::kLong);
  auto picked = at::zeros({batch, kv_heads, width}, at::kBool);
  for (int64_t task = 0; task < batch * kv_heads; ++task) {
    std::copy(lists[task].begin(), lists[task].end(), index.data_ptr<int64_t>() + task * width);
    std::fill_n(picked.data_ptr<bool>() + task * width, lists[task].size(), true);
  }
  return {index, picked};
}

std::tuple<at::Tensor, at::Tensor> gist_top_chunks(const at::Tensor& grouped, const at::Tensor& gist_k,
                                                   const at::Tensor& gist_valid, const at::Tensor& window_start,
                                                   const at::Tensor& k, bool group_sum) {
  // The Python wrapper gives clearer messages for the same checks. These guard direct calls.
  TORCH_CHECK(grouped.dim() == 4 && gist_k.dim() == 4, "gist_top_chunks takes (B, Hk, G, D) queries and "
              "(B, Hk, N, D) gist keys");
  const int64_t batch = grouped.size(0), kv_heads = grouped.size(1), group = grouped.size(2), dim = grouped.size(3);
  const int64_t num_chunks = gist_k.size(2);
  TORCH_CHECK(gist_k.sizes() == at::IntArrayRef({batch, kv_heads, num_chunks, dim}), "gist_k must be (B, Hk, N, D) "
              "with the queries' B, Hk and D");
  TORCH_CHECK(grouped.scalar_type() == at::kFloat && gist_k.scalar_type() == at::kFloat && grouped.is_contiguous() &&
                  gist_k.is_contiguous(), "gist_top_chunks takes contiguous float32 queries and gist keys");
  check_rows(gist_valid, window_start, k, batch, num_chunks);
  const float* queries = grouped.data_ptr<float>();
  const float* gists = gist_k.data_ptr<float>();
  const auto lists = choose_all(batch, kv_heads, gist_valid, window_start, k, [&](int64_t task, const RowChoice& row) {
    return score_and_choose(queries + task * group * dim, gists + task * num_chunks * dim, group, dim, row,
                            group_sum);
  });
  return pack_lists(lists, batch, kv_heads);
}

std::tuple<at::Tensor, at::Tensor> top_chunks(const at::Tensor& scores, const at::Tensor& gist_valid,
                                              const at::Tensor& window_start, const at::Tensor& k, bool group_sum) {
  TORCH_CHECK(scores.dim() == 4 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "top_chunks takes contiguous (B, Hk, G, N) float32 scores");
  const int64_t batch = scores.size(0), kv_heads = scores.size(1), group = scores.size(2), num_chunks = scores.size(3);
  check_rows(gist_valid, window_start, k, batch, num_chunks);
  const float* data = scores.data_ptr<float>();
  const auto lists = choose_all(batch, kv_heads, gist_valid, window_start, k, [&](int64_t task, const RowChoice& row) {
    return choose(data + task * group * num_chunks, group, row, group_sum);
  });
  return pack_lists(lists, batch, kv_heads);
}

// Choose each task's chunks as gist_top_chunks does, then attend the sinks, the recent tokens and
// the chunks in one softmax, in one pass per task. The task's scores and chunk list stay in its
// thread's cache, and while one thread streams gists the other can be attending chunks.
// Check (B, Hk, L, D) float32 keys and values with (B, L) bool flags of the valid rows.
void check_dense(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& valid, const at::Tensor& grouped,
                 const char* name) {
  const int64_t batch = grouped.size(0), kv_heads = grouped.size(1), dim = grouped.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == batch && keys.size(1) == kv_heads && keys.size(3) == dim &&
                  values.sizes() == keys.sizes() && valid.sizes() == at::IntArrayRef({batch, keys.size(2)}),
              name, " keys and values must be (B, Hk, L, D) with (B, L) flags");
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat && valid.scalar_type() == at::kBool &&
                  keys.is_contiguous() && values.is_contiguous() && valid.is_contiguous(),
              name, " keys and values must be contiguous float32 and their flags contiguous bool");
}

DenseRows dense_rows(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& valid, int64_t task,
                     int64_t kv_heads) {
  const int64_t count = keys.size(2), dim = keys.size(3);
  return {keys.data_ptr<float>() + task * count * dim, values.data_ptr<float>() + task * count * dim,
          valid.data_ptr<bool>() + (task / kv_heads) * count, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_and_attend(
    const at::Tensor& grouped, const at::Tensor& gist_k, const at::Tensor& gist_valid, const at::Tensor& window_start,
    const at::Tensor& k, bool group_sum, const at::Tensor& chunk_k, const at::Tensor& chunk_v,
    const at::Tensor& chunk_valid, const at::Tensor& gist_v, bool with_gists, const at::Tensor& sink_k,
    const at::Tensor& sink_v, const at::Tensor& sink_valid, const at::Tensor& recent_k, const at::Tensor& recent_v,
    const at::Tensor& recent_valid) {
  check_recall_tensors(grouped, chunk_k, chunk_v, chunk_valid, gist_k, gist_v);
  TORCH_CHECK(gist_k.numel() > 0 || chunk_k.size(2) == 0, "select_and_attend needs the gist keys to score");
  check_dense(sink_k, sink_v, sink_valid, grouped, "sink");
  check_dense(recent_k, recent_v, recent_valid, grouped, "recent");
  const int64_t batch = grouped.size(0), kv_heads = grouped.size(1), group = grouped.size(2), dim = grouped.size(3);
  const int64_t num_chunks = chunk_k.size(2), chunk_len = chunk_k.size(3);
  check_rows(gist_valid, window_start, k, batch, num_chunks);
  auto numer = at::empty({batch, kv_heads, group, dim}, grouped.options());
  auto top = at::empty({batch, kv_heads, group}, grouped.options());
  auto total = at::empty({batch, kv_heads, group}, grouped.options());
  const auto lists = choose_all(batch, kv_heads, gist_valid, window_start, k, [&](int64_t task, const RowChoice& row) {
    const float* gists = gist_k.data_ptr<float>() + task * num_chunks * dim;
    std::vector<int64_t> list = score_and_choose(grouped.data_ptr<float>() + task * group * dim, gists, group, dim,
                                                 row, group_sum);
    const HeadTask t{grouped.data_ptr<float>() + task * group * dim,
                     chunk_k.data_ptr<float>() + task * num_chunks * chunk_len * dim,
                     chunk_v.data_ptr<float>() + task * num_chunks * chunk_len * dim,
                     chunk_valid.data_ptr<bool>() + (task / kv_heads) * num_chunks * chunk_len,
                     list.data(),
                     nullptr,
                     with_gists ? gists : nullptr,
                     with_gists ? gist_v.data_ptr<float>() + task * num_chunks * dim : nullptr,
                     numer.data_ptr<float>() + task * group * dim,
                     top.data_ptr<float>() + task * group,
                     total.data_ptr<float>() + task * group,
                     group, dim, chunk_len, static_cast<int64_t>(list.size()),
                     dense_rows(sink_k, sink_v, sink_valid, task, kv_heads),
                     dense_rows(recent_k, recent_v, recent_valid, task, kv_heads)};
    run_task(t);
    return list;
  });
  auto [index, picked] = pack_lists(lists, batch, kv_heads);
  return {index, picked, numer, top, total};
}

}  // namespace

namespace gsa_kernels {

// Score the candidates of one task for every query head, kMaxGroup heads at a time, and choose.
// The buffers are kept per thread, because allocating them for every task costs page faults.
std::vector<int64_t> score_and_choose(const float* query, const float* gists, int64_t group, int64_t dim,
                                      const RowChoice& row, bool group_sum) {
  thread_local std::vector<float> slice, summed;  // (end, slice heads) and (end,)
  thread_local std::vector<Ranked> best;
  const int64_t end = row.candidate_end();
  slice.resize(std::min(group, kMaxGroup) * end);
  if (group_sum) summed.assign(end, 0.f);
  std::vector<uint8_t> chosen(row.num_chunks, 0);
  for (int64_t first = 0; first < group; first += kMaxGroup) {
    const int64_t size = std::min(kMaxGroup, group - first);
    score_slice(query + first * dim, gists, size, end, dim, slice.data());
    if (group_sum) {
      for (int64_t n = 0; n < end; ++n)
        for (int64_t g = 0; g < size; ++g) summed[n] += slice[n * size + g];
    } else {
      for (int64_t g = 0; g < size; ++g) mark_top(slice.data() + g, size, row, best, chosen);
    }
  }
  if (group_sum) mark_top(summed.data(), 1, row, best, chosen);
  return chosen_list(row, chosen);
}

}  // namespace gsa_kernels

TORCH_LIBRARY_FRAGMENT(gsa_cpu, m) {
  m.def("gist_top_chunks(Tensor grouped, Tensor gist_k, Tensor gist_valid, Tensor window_start, Tensor k, "
        "bool group_sum) -> (Tensor, Tensor)");
  m.def("top_chunks(Tensor scores, Tensor gist_valid, Tensor window_start, Tensor k, bool group_sum) "
        "-> (Tensor, Tensor)");
  m.def("select_and_attend(Tensor grouped, Tensor gist_k, Tensor gist_valid, Tensor window_start, Tensor k, "
        "bool group_sum, Tensor chunk_k, Tensor chunk_v, Tensor chunk_valid, Tensor gist_v, bool with_gists, "
        "Tensor sink_k, Tensor sink_v, Tensor sink_valid, Tensor recent_k, Tensor recent_v, Tensor recent_valid) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gsa_cpu, CPU, m) {
  m.impl("gist_top_chunks", &gist_top_chunks);
  m.impl("top_chunks", &top_chunks);
  m.impl("select_and_attend", &select_and_attend);
}
