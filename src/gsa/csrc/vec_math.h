// Vector helpers shared by the CPU kernels: eight-float vectors, a vector exp, and the logits of
// grouped queries against a list of key rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace gsa_kernels {

// Eight floats in one AVX register where the compiler targets AVX, in two SSE registers otherwise.
// The aligned(4) attribute lets a dereference load from any float address. A sixteen-lane
// AVX-512 build of these kernels ran within 10% of this one on an Intel Xeon with AVX-512, so the
// kernels use eight lanes everywhere.
constexpr int64_t kLanes = 8;
typedef float vec __attribute__((vector_size(32), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(32)));
constexpr int64_t kMaxGroup = 8;  // query heads per pass over the keys, so larger groups take several passes

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
inline float lane_sum(vec v) {
  float sum = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) sum += v[lane];
  return sum;
}

// Lane i of the result is the sum of the lanes of v[i].
inline vec lane_sums(const vec (&v)[kLanes]) {
#if defined(__AVX__)
  // Three rounds of pairwise adds, then the two 128-bit halves of each sum are added.
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  vec sums;
  for (int i = 0; i < kLanes; ++i) sums[i] = lane_sum(v[i]);
  return sums;
#endif
}

// exp of each lane, within a few float32 ulps. The input is split as x = n ln2 + r with n an
// integer and |r| <= ln2 / 2, so exp(x) = 2^n exp(r): a degree-7 Taylor polynomial gives exp(r)
// (truncation error below 1e-8 relative) and 2^n goes into the exponent bits. Lanes below -87
// give 0, so exp(-inf) = 0; lanes above 88 are clamped to exp(88); NaN stays NaN.
inline vec exp_lanes(vec x) {
  const vec low = vec{} - 87.f, high = vec{} + 88.f;
  const ivec underflow = x < low;
  x = x > high ? high : x;
  x = x < low ? low : x;
  const vec t = x * 1.44269504f;  // x / ln2
  const ivec n = __builtin_convertvector(t + (t >= 0.f ? 0.5f : -0.5f), ivec);  // rounded to nearest
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln2 in two parts keeps r exact
  vec p = vec{} + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vec result = p * scale;
  return underflow ? vec{} : result;
}

inline void prefetch_rows(const float* rows, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(rows);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(float)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

// Rows of a later block of keys and values, prefetched while the current block is computed so
// that the memory reads overlap the arithmetic.
struct Ahead {
  const float* keys = nullptr;    // (rows, D)
  const float* values = nullptr;  // (rows, D), or nullptr for keys alone
  int64_t rows = 0;
};

// Logits of H query heads against R key rows, R * H = kLanes, written to ``out`` as
// out[r * group + h]. The dot products run as kLanes vector accumulators that one transposing
// reduction sums, so no accumulator is summed across its lanes on its own.
template <int R, int H>
inline void block_logits(const float* query, const float* const* rows, int64_t dim, int64_t group, float* out) {
  static_assert(R * H == kLanes, "a block holds one vector of dot products");
  const int64_t body = dim - dim % kLanes;
  vec acc[kLanes] = {};
  for (int64_t d = 0; d < body; d += kLanes) {
    vec x[R];
    for (int r = 0; r < R; ++r) x[r] = load(rows[r] + d);
    for (int h = 0; h < H; ++h) {
      const vec q = load(query + h * dim + d);
      for (int r = 0; r < R; ++r) acc[h * R + r] += q * x[r];
    }
  }
  vec sums = lane_sums(acc);
  for (int64_t d = body; d < dim; ++d)  // the tail of a head dim that is not a multiple of kLanes
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < R; ++r) sums[h * R + r] += query[h * dim + d] * rows[r][d];
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < R; ++r) out[r * group + h] = sums[h * R + r];
}

// Logits of G query heads against one key row, out[g] = q_g . k, each summed across its lanes.
template <int G>
inline void single_row_logits(const float* query, const float* row, int64_t dim, float* out) {
  const int64_t body = dim - dim % kLanes;
  vec acc[G] = {};
  for (int64_t d = 0; d < body; d += kLanes) {
    const vec x = load(row + d);
    for (int g = 0; g < G; ++g) acc[g] += load(query + g * dim + d) * x;
  }
  for (int g = 0; g < G; ++g) {
    float sum = lane_sum(acc[g]);
    for (int64_t d = body; d < dim; ++d) sum += query[g * dim + d] * row[d];
    out[g] = sum;
  }
}

// The largest power of two that divides G, capped so that a block keeps at least four rows.
constexpr int heads_per_block(int group) {
  int heads = 1;
  while (group % (2 * heads) == 0 && 2 * heads <= kLanes / 4) heads *= 2;
  return heads;
}

// logits[r * G + g] = q_g . k_r for ``count`` key rows, where ``row(r)`` returns a pointer to row r.
// Rows go in blocks of kLanes / H, with the heads in groups of H. The rows after the last full
// block go one at a time. The rows of ``ahead`` are prefetched along the way.
template <int G, typename Rows>
void row_logits(const float* query, const Rows& row, int64_t count, int64_t dim, float* logits,
                const Ahead& ahead = Ahead()) {
  constexpr int H = heads_per_block(G), R = kLanes / H;
  // Prefetch as many rows of ``ahead`` per block as leave none behind after the last block.
  const int64_t blocks = count / R + count % R, per_block = blocks > 0 ? (ahead.rows + blocks - 1) / blocks : 0;
  int64_t prefetched = 0;
  const auto prefetch_some = [&] {
    if (ahead.keys == nullptr || prefetched >= ahead.rows) return;
    const int64_t floats = std::min(per_block, ahead.rows - prefetched) * dim;
    prefetch_rows(ahead.keys + prefetched * dim, floats);
    if (ahead.values != nullptr) prefetch_rows(ahead.values + prefetched * dim, floats);
    prefetched += per_block;
  };
  const float* rows[R];
  int64_t first = 0;
  for (; first + R <= count; first += R) {
    prefetch_some();
    for (int r = 0; r < R; ++r) rows[r] = row(first + r);
    for (int g = 0; g < G; g += H) block_logits<R, H>(query + g * dim, rows, dim, G, logits + first * G + g);
  }
  for (; first < count; ++first) {
    prefetch_some();
    single_row_logits<G>(query, row(first), dim, logits + first * G);
  }
}

}  // namespace gsa_kernels
