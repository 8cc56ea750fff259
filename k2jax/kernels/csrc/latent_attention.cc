// Absorbed MLA attention over the paged latent cache, for XLA:CPU, called through the XLA FFI
// (k2jax/attention_cpu.py).
//
//   out[b, t, n, :C] = sum_s softmax_s(scale * q[b, t, n] . row_s) * row_s[:C],  s <= pos[b, t]
//
// where row_s = [c_kv | k_pe] (W = C + R values) is key position s of sequence b, read in place
// from page block_table[b, s / K], slot s % K, of one layer of the pool [L, P, K, W]. The query
// is [q_lat | q_pe], with W_UK already folded into q_lat (k2jax.attention).
//
// XLA:CPU runs this from jnp with a bf16 cache at ~0.4 GB/s of cache: it gathers each row's
// pages, and its bf16 dots are slow. Here each cached row is widened to float32 once, in a
// block of 8 keys, and used for every head's score and for the weighted sum, with an online
// softmax per head. A query's keys are split into ranges when there are fewer queries than
// threads (decode); the ranges' partial sums are merged by their maxima. Padding queries
// (negative positions) get zeros.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kKeyBlock = 8;
constexpr int64_t kMinKeysPerRange = 512;
constexpr int64_t kItemsPerThread = 8;

struct Problem {
  const float* q;              // [B, T, N, W]
  const void* pages;           // this layer: [P, K, W]
  bool pages_bf16;
  const int32_t* tables;       // [B, Pseq]
  const int32_t* positions;    // [B, T]
  int64_t batch, queries, heads, width, latent, page_size, table_width, num_pages;
  float scale;
};

// A range of one query's keys; its partial result is (max, sum, acc) per head.
struct Range {
  int64_t b, t, key_begin, key_end;
};

#define K2JAX_INLINE inline __attribute__((always_inline))

// H dot products of length `width` against one row, with 16 partial sums per head so they
// vectorize without reassociation and H independent chains hide the FMA latency.
template <int H>
K2JAX_INLINE void Dots(const float* q, int64_t width, const float* row, float* out) {
  float part[H][16] = {};
  int64_t w = 0;
  for (; w + 16 <= width; w += 16) {
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < 16; ++i) part[h][i] += q[h * width + w + i] * row[w + i];
    }
  }
  for (int h = 0; h < H; ++h) {
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += part[h][i];
    for (int64_t tail = w; tail < width; ++tail) sum += q[h * width + tail] * row[tail];
    out[h] = sum;
  }
}

K2JAX_INLINE void AttendRange(const Problem& pr, const Range& r, float* max_out, float* sum_out,
                              float* acc_out) {
  const int64_t heads = pr.heads, width = pr.width, latent = pr.latent;
  std::vector<float> scratch(heads * width + kKeyBlock * width + kKeyBlock * heads);
  float* q = scratch.data();                  // [N, W], scaled
  float* rows = q + heads * width;            // [kKeyBlock, W]
  float* scores = rows + kKeyBlock * width;   // [kKeyBlock, N]
  const float* q_in = pr.q + (r.b * pr.queries + r.t) * heads * width;
  for (int64_t i = 0; i < heads * width; ++i) q[i] = q_in[i] * pr.scale;
  for (int64_t n = 0; n < heads; ++n) {
    max_out[n] = -std::numeric_limits<float>::infinity();
    sum_out[n] = 0.0f;
  }
  std::fill(acc_out, acc_out + heads * latent, 0.0f);
  const int32_t* table = pr.tables + r.b * pr.table_width;

  for (int64_t first = r.key_begin; first < r.key_end; first += kKeyBlock) {
    const int64_t count = std::min(kKeyBlock, r.key_end - first);
    if (count < kKeyBlock) {  // the weighted sum reads whole blocks: no stale rows past count
      std::fill(rows + count * width, rows + kKeyBlock * width, 0.0f);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t key = first + j;
      const int64_t page = table[key / pr.page_size];
      const int64_t offset = (page * pr.page_size + key % pr.page_size) * width;
      float* dst = rows + j * width;
      if (pr.pages_bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(pr.pages) + offset;
        for (int64_t w = 0; w < width; ++w) dst[w] = k2jax::Bf16ToF32(src[w]);
      } else {
        std::memcpy(dst, static_cast<const float*>(pr.pages) + offset, width * sizeof(float));
      }
      int64_t n = 0;
      for (; n + 8 <= heads; n += 8) Dots<8>(q + n * width, width, dst, scores + j * heads + n);
      for (; n + 4 <= heads; n += 4) Dots<4>(q + n * width, width, dst, scores + j * heads + n);
      for (; n < heads; ++n) Dots<1>(q + n * width, width, dst, scores + j * heads + n);
    }
    for (int64_t n = 0; n < heads; ++n) {
      float block_max = scores[n];
      for (int64_t j = 1; j < count; ++j) block_max = std::max(block_max, scores[j * heads + n]);
      const float new_max = std::max(max_out[n], block_max);
      float* acc = acc_out + n * latent;
      if (new_max > max_out[n] && sum_out[n] > 0.0f) {
        const float correction = std::exp(max_out[n] - new_max);
        sum_out[n] *= correction;
        for (int64_t c = 0; c < latent; ++c) acc[c] *= correction;
      }
      max_out[n] = new_max;
      float p[kKeyBlock] = {};
      for (int64_t j = 0; j < count; ++j) {
        p[j] = std::exp(scores[j * heads + n] - new_max);
        sum_out[n] += p[j];
      }
      // Rows past `count` are zeros and weigh 0.
      for (int64_t c = 0; c < latent; ++c) {
        float s = acc[c];
        for (int64_t j = 0; j < kKeyBlock; ++j) s += p[j] * rows[j * width + c];
        acc[c] = s;
      }
    }
  }
}

#if K2JAX_X86
__attribute__((target("avx512f"))) void AttendAvx512(const Problem& pr, const Range& r, float* m,
                                                     float* l, float* acc) {
  AttendRange(pr, r, m, l, acc);
}
__attribute__((target("avx2,fma"))) void AttendAvx2(const Problem& pr, const Range& r, float* m,
                                                    float* l, float* acc) {
  AttendRange(pr, r, m, l, acc);
}
#endif  // K2JAX_X86
void AttendScalar(const Problem& pr, const Range& r, float* m, float* l, float* acc) {
  AttendRange(pr, r, m, l, acc);
}

ffi::Error LatentAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::AnyBuffer pages, ffi::Buffer<ffi::S32> layer,
                               ffi::Buffer<ffi::S32> block_tables,
                               ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                               float scale, int32_t latent, int32_t isa) {
  if (ffi::Error error = k2jax::ResolveIsa("latent_attention", isa, &isa); !error.success()) {
    return error;
  }
  const auto qd = q.dimensions();
  const auto pd = pages.dimensions();
  const auto td = block_tables.dimensions();
  const auto sd = positions.dimensions();
  if (qd.size() != 4 || pd.size() != 4 || td.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "latent_attention: q must be [B, T, N, W], pages [L, P, K, W], block_tables [B, Pseq], "
        "positions [B, T]");
  }
  Problem pr;
  pr.batch = qd[0];
  pr.queries = qd[1];
  pr.heads = qd[2];
  pr.width = qd[3];
  pr.latent = latent;
  pr.num_pages = pd[1];
  pr.page_size = pd[2];
  pr.table_width = td[1];
  pr.scale = scale;
  if (pd[3] != pr.width || td[0] != pr.batch || sd[0] != pr.batch || sd[1] != pr.queries ||
      latent < 1 || latent > pr.width) {
    return ffi::Error::InvalidArgument(
        "latent_attention: shapes disagree (q, pages, block_tables and positions must share "
        "B, T and W; 0 < latent <= W)");
  }
  const auto type = pages.element_type();
  if (type != ffi::DataType::BF16 && type != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("latent_attention: pages must be bfloat16 or float32");
  }
  pr.pages_bf16 = type == ffi::DataType::BF16;
  const int32_t layer_index = *layer.typed_data();
  if (layer_index < 0 || layer_index >= pd[0]) {
    return ffi::Error::InvalidArgument("latent_attention: layer index out of range");
  }
  const int64_t layer_elements = pr.num_pages * pr.page_size * pr.width;
  const size_t item_bytes = pr.pages_bf16 ? 2 : 4;
  pr.pages = static_cast<const char*>(pages.untyped_data()) +
             layer_index * layer_elements * item_bytes;
  pr.tables = block_tables.typed_data();
  pr.positions = positions.typed_data();
  pr.q = q.typed_data();
  // Table entries are read for every visible key: refuse ids outside the pool up front.
  for (int64_t i = 0; i < pr.batch * pr.table_width; ++i) {
    if (pr.tables[i] < 0 || pr.tables[i] >= pr.num_pages) {
      return ffi::Error::InvalidArgument("latent_attention: a block table names a page outside "
                                         "the pool");
    }
  }

  // One range per query, or several per query (of at least kMinKeysPerRange keys) when there
  // are fewer than kItemsPerThread queries per thread: small items balance the threads when
  // one of them is held up (shared CPUs), at the cost of merging more partial sums.
  const int64_t num_queries = pr.batch * pr.queries;
  const int64_t threads = k2jax::Workers(pool);
  const int64_t ranges_wanted = (kItemsPerThread * threads + num_queries - 1) / num_queries;
  const int64_t keys = pr.table_width * pr.page_size;
  std::vector<Range> ranges;
  std::vector<int64_t> first_range(num_queries + 1, 0);
  for (int64_t b = 0; b < pr.batch; ++b) {
    for (int64_t t = 0; t < pr.queries; ++t) {
      first_range[b * pr.queries + t] = static_cast<int64_t>(ranges.size());
      const int64_t pos = pr.positions[b * pr.queries + t];
      if (pos < 0) continue;  // padding
      const int64_t visible = std::min<int64_t>(pos + 1, keys);
      const int64_t pieces = std::max<int64_t>(
          1, std::min<int64_t>(ranges_wanted, visible / kMinKeysPerRange));
      const int64_t step = (visible + pieces - 1) / pieces;
      for (int64_t k = 0; k < visible; k += step) {
        ranges.push_back({b, t, k, std::min(visible, k + step)});
      }
    }
  }
  first_range[num_queries] = static_cast<int64_t>(ranges.size());

  const int64_t heads = pr.heads, width_out = latent;
  std::vector<float> maxima(ranges.size() * heads), sums(ranges.size() * heads);
  std::vector<float> accs(ranges.size() * heads * width_out);
  auto attend = AttendScalar;
#if K2JAX_X86
  if (isa == k2jax::kAvx512) attend = AttendAvx512;
  if (isa == k2jax::kAvx2) attend = AttendAvx2;
#endif
  k2jax::ParallelFor(pool, static_cast<int64_t>(ranges.size()), [&](int64_t i) {
    attend(pr, ranges[i], &maxima[i * heads], &sums[i * heads], &accs[i * heads * width_out]);
  });

  // Merge each query's ranges: rescale every partial to the common maximum.
  float* result = out->typed_data();
  std::fill(result, result + num_queries * heads * width_out, 0.0f);
  for (int64_t query = 0; query < num_queries; ++query) {
    const int64_t begin = first_range[query], end = first_range[query + 1];
    if (begin == end) continue;
    for (int64_t n = 0; n < heads; ++n) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = begin; i < end; ++i) top = std::max(top, maxima[i * heads + n]);
      float total = 0.0f;
      float* dst = result + (query * heads + n) * width_out;
      for (int64_t i = begin; i < end; ++i) {
        const float weight = std::exp(maxima[i * heads + n] - top);
        total += weight * sums[i * heads + n];
        const float* acc = &accs[(i * heads + n) * width_out];
        for (int64_t c = 0; c < width_out; ++c) dst[c] += weight * acc[c];
      }
      for (int64_t c = 0; c < width_out; ++c) dst[c] /= total;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxLatentAttention, LatentAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("latent")
                                  .Attr<int32_t>("isa"));
