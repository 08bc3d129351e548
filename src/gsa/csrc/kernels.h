// Pieces of the CPU kernels that more than one operator runs: the recall attention of one
// (batch row, KV head) task, and the chunk selection of one task.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gsa_kernels {

// Key and value rows of one (batch row, KV head) attended besides the chunks, such as the sinks
// or the recent tokens, with the valid ones flagged.
struct DenseRows {
  const float* keys = nullptr;    // (count, D)
  const float* values = nullptr;  // (count, D)
  const bool* valid = nullptr;    // (count,)
  int64_t count = 0;
};

// Pointers and sizes of one (batch row, KV head) task of the recall attention.
struct HeadTask {
  const float* query;        // (G, D)
  const float* keys;         // (N, Cm, D)
  const float* values;       // (N, Cm, D)
  const bool* valid;         // (N, Cm)
  const int64_t* index;      // (K,)
  const bool* picked;        // (K,), or nullptr when every entry is picked
  const float* gist_keys;    // (N, D), or nullptr
  const float* gist_values;  // (N, D), or nullptr
  float* numer;              // (G, D)
  float* top;                // (G,)
  float* total;              // (G,)
  int64_t group, dim, chunk_len, recalled;
  DenseRows sinks, recent;  // attended before the chunks; empty unless the caller fills them
};

// Attend the task's picked chunks with an online softmax, writing numer, top and total.
void run_task(const HeadTask& task);

// Check the shapes, dtypes and layout of the recall attention's queries and tiers. Empty gist
// tensors mean that gists are not attended.
void check_recall_tensors(const at::Tensor& grouped, const at::Tensor& chunk_k, const at::Tensor& chunk_v,
                          const at::Tensor& chunk_valid, const at::Tensor& gist_k, const at::Tensor& gist_v);

// The chunks of one (batch row, KV head) task and how many each head keeps.
struct RowChoice {
  const bool* valid;  // (N,)
  int64_t num_chunks;
  int64_t window_start;  // candidates are the valid chunks before it
  int64_t k;

  int64_t candidate_end() const { return std::clamp<int64_t>(window_start, 0, num_chunks); }
};

// Score the task's candidates with its G queries (G, D) against its gists (N, D), keep the top k
// per head (or of the summed scores), add the window, and return the chosen chunks in ascending order.
std::vector<int64_t> score_and_choose(const float* query, const float* gists, int64_t group, int64_t dim,
                                      const RowChoice& row, bool group_sum);

}  // namespace gsa_kernels
