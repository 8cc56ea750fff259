// Fused INT4 expert matvec for XLA:CPU, called through the XLA FFI (k2jax/int4_cpu.py).
//
//   y[p, o] = sum_i x[p / k, i] * W[e_p, o, i],  W[e, o, i] = (nibble - 8) * scale[e, o, i / 32]
//
// for pairs p = (row, choice) of `k` choices per row of x (k = 1: one x row per pair).
//
// W stays packed (compressed-tensors' int32 words, lowest nibble first: 4.5 bits per weight
// with the bf16 group scales) and is read once per call: each weight row of an expert is
// decoded in registers and multiplied against every pair (token, choice) routed to that
// expert. XLA:CPU cannot fuse that decode into its dot, so jnp code has to widen each expert
// to float32 in memory first and read it back (docs/int4.md); this kernel never does.
//
// Products are exact in float32 (a 4-bit integer times a bf16 scale), so results differ from
// "dequantize, then matmul" only in the order of the float32 sum.
//
// Work is split into (expert, block of rows) items shared by the calling thread and XLA's
// intra-op thread pool (k2jax/csrc/common.h).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

#if K2JAX_X86
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kGroup = 32;          // input columns per scale (K2's group size)
constexpr int kBytesPerGroup = 16;  // 32 nibbles
constexpr int kMaxPairsPerPass = 4;
constexpr int64_t kRowsPerItem = 32;

using k2jax::Bf16ToF32;

// Within each group of 32 inputs, the kernels decode the low nibbles (even columns) then the
// high nibbles (odd columns), so x is permuted once per call to match: [even 16 | odd 16].
void PermuteInputs(const float* x, int64_t rows, int64_t inputs, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * inputs;
    float* dst = out + r * inputs;
    for (int64_t g = 0; g < inputs; g += kGroup) {
      for (int j = 0; j < kGroup / 2; ++j) {
        dst[g + j] = src[g + 2 * j];
        dst[g + kGroup / 2 + j] = src[g + 2 * j + 1];
      }
    }
  }
}

// One block of weight rows against `np` pairs. `xs[p]` are permuted inputs, `ys[p]` outputs.
struct RowBlock {
  const uint8_t* bytes;    // row `row_begin` of this expert, inputs / 2 bytes per row
  const uint16_t* scales;  // row `row_begin`, groups per row
  int64_t groups;
  int64_t row_begin, row_end;
  int np;
  const float* xs[kMaxPairsPerPass];
  float* ys[kMaxPairsPerPass];
};

void RowsScalar(const RowBlock& b) {
  for (int64_t o = b.row_begin; o < b.row_end; ++o) {
    const uint8_t* w = b.bytes + (o - b.row_begin) * b.groups * kBytesPerGroup;
    const uint16_t* s = b.scales + (o - b.row_begin) * b.groups;
    for (int p = 0; p < b.np; ++p) {
      float acc = 0.0f;
      for (int64_t g = 0; g < b.groups; ++g) {
        const float scale = Bf16ToF32(s[g]);
        const float* x = b.xs[p] + g * kGroup;
        for (int j = 0; j < kBytesPerGroup; ++j) {
          const uint8_t byte = w[g * kBytesPerGroup + j];
          acc += (static_cast<float>(byte & 0xF) - 8.0f) * scale * x[j];
          acc += (static_cast<float>(byte >> 4) - 8.0f) * scale * x[kGroup / 2 + j];
        }
      }
      b.ys[p][o] = acc;
    }
  }
}

#if K2JAX_X86
__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// AVX2: a group's 16 bytes become four vectors of 8 scaled weights (even columns 0-14,
// even 16-30, odd 1-15, odd 17-31), each FMA'd into its own accumulator per pair so the
// FMA latency chains stay independent.
template <int NP>
__attribute__((target("avx2,fma"))) void RowsAvx2(const RowBlock& b) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i offset = _mm_set1_epi8(8);
  for (int64_t o = b.row_begin; o < b.row_end; ++o) {
    const uint8_t* w = b.bytes + (o - b.row_begin) * b.groups * kBytesPerGroup;
    const uint16_t* s = b.scales + (o - b.row_begin) * b.groups;
    __m256 acc[NP][4];
    for (int p = 0; p < NP; ++p)
      for (int k = 0; k < 4; ++k) acc[p][k] = _mm256_setzero_ps();
    for (int64_t g = 0; g < b.groups; ++g) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, low_mask), offset);
      const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low_mask), offset);
      const __m256 scale = _mm256_set1_ps(Bf16ToF32(s[g]));
      __m256 wv[4];
      wv[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), scale);
      wv[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), scale);
      wv[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), scale);
      wv[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), scale);
      for (int p = 0; p < NP; ++p) {
        const float* x = b.xs[p] + g * kGroup;
        for (int k = 0; k < 4; ++k)
          acc[p][k] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(x + 8 * k), acc[p][k]);
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[p][0], acc[p][1]),
                                       _mm256_add_ps(acc[p][2], acc[p][3]));
      b.ys[p][o] = HorizontalSum(sum);
    }
  }
}

// AVX-512: the same with 16 weights per vector (even columns 0-30, odd 1-31); two groups per
// iteration keep four accumulator chains per pair.
template <int NP>
__attribute__((target("avx512f"))) void RowsAvx512(const RowBlock& b) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i offset = _mm_set1_epi8(8);
  for (int64_t o = b.row_begin; o < b.row_end; ++o) {
    const uint8_t* w = b.bytes + (o - b.row_begin) * b.groups * kBytesPerGroup;
    const uint16_t* s = b.scales + (o - b.row_begin) * b.groups;
    __m512 acc[NP][4];
    for (int p = 0; p < NP; ++p)
      for (int k = 0; k < 4; ++k) acc[p][k] = _mm512_setzero_ps();
    for (int64_t g = 0; g < b.groups; ++g) {
      const int half = static_cast<int>(g & 1) * 2;
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, low_mask), offset);
      const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low_mask), offset);
      const __m512 scale = _mm512_set1_ps(Bf16ToF32(s[g]));
      const __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), scale);
      const __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), scale);
      for (int p = 0; p < NP; ++p) {
        const float* x = b.xs[p] + g * kGroup;
        acc[p][half] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[p][half]);
        acc[p][half + 1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 16), acc[p][half + 1]);
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[p][0], acc[p][1]),
                                       _mm512_add_ps(acc[p][2], acc[p][3]));
      b.ys[p][o] = _mm512_reduce_add_ps(sum);
    }
  }
}

#endif  // K2JAX_X86

using RowsFn = void (*)(const RowBlock&);

struct Kernels {
  RowsFn by_pairs[kMaxPairsPerPass + 1];
};

constexpr Kernels kScalarKernels = {{nullptr, RowsScalar, RowsScalar, RowsScalar, RowsScalar}};
#if K2JAX_X86
constexpr Kernels kAvx2Kernels = {
    {nullptr, RowsAvx2<1>, RowsAvx2<2>, RowsAvx2<3>, RowsAvx2<4>}};
constexpr Kernels kAvx512Kernels = {
    {nullptr, RowsAvx512<1>, RowsAvx512<2>, RowsAvx512<3>, RowsAvx512<4>}};
#endif

// `isa` is resolved (k2jax::ResolveIsa): supported by this CPU.
const Kernels& KernelsFor(int32_t isa) {
#if K2JAX_X86
  if (isa == k2jax::kAvx512) return kAvx512Kernels;
  if (isa == k2jax::kAvx2) return kAvx2Kernels;
#endif
  return kScalarKernels;
}

// One unit of work: a block of one expert's rows against every pair routed to it.
struct Item {
  int64_t expert;
  int64_t row_begin, row_end;
  int64_t pair_begin, pair_end;  // into `order`
};

struct Job {
  const Kernels* kernels;
  const float* x_perm;       // [P / k, I]
  int64_t choices;           // k: pairs per row of x
  const uint8_t* bytes;      // experts of this layer, [E, O, I / 2]
  const uint16_t* scales;    // [E, O, G]
  float* y;                  // [P, O]
  int64_t outputs, inputs, groups;
  std::vector<int64_t> order;  // pairs sorted by expert
  std::vector<Item> items;

  void RunItem(const Item& item) const {
    const int64_t row_bytes = inputs / 2;
    for (int64_t first = item.pair_begin; first < item.pair_end; first += kMaxPairsPerPass) {
      RowBlock block;
      block.bytes = bytes + (item.expert * outputs + item.row_begin) * row_bytes;
      block.scales = scales + (item.expert * outputs + item.row_begin) * groups;
      block.groups = groups;
      block.row_begin = item.row_begin;
      block.row_end = item.row_end;
      block.np = static_cast<int>(std::min<int64_t>(kMaxPairsPerPass, item.pair_end - first));
      for (int p = 0; p < block.np; ++p) {
        const int64_t pair = order[first + p];
        block.xs[p] = x_perm + (pair / choices) * inputs;
        block.ys[p] = y + pair * outputs;
      }
      kernels->by_pairs[block.np](block);
    }
  }
};

ffi::Error Int4MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S32> expert_ids, ffi::Buffer<ffi::S32> packed,
                          ffi::Buffer<ffi::BF16> scale, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t choices) {
  if (ffi::Error error = k2jax::ResolveIsa("int4_matvec", isa, &isa); !error.success()) {
    return error;
  }
  const auto xd = x.dimensions();
  const auto wd = packed.dimensions();
  const auto sd = scale.dimensions();
  if (xd.size() != 2 || expert_ids.dimensions().size() != 1 || choices < 1 ||
      expert_ids.dimensions()[0] != xd[0] * choices) {
    return ffi::Error::InvalidArgument(
        "int4_matvec: x must be [R, I] and expert_ids [R * choices]");
  }
  if ((wd.size() != 3 && wd.size() != 4) || sd.size() != wd.size()) {
    return ffi::Error::InvalidArgument(
        "int4_matvec: packed / scale must be [E, O, I/8] / [E, O, I/32], or a layer stack "
        "[L, E, O, I/8] / [L, E, O, I/32]");
  }
  const bool stacked = wd.size() == 4;
  const int64_t num_layers = stacked ? wd[0] : 1;
  const int64_t experts = wd[wd.size() - 3];
  const int64_t outputs = wd[wd.size() - 2];
  const int64_t words = wd[wd.size() - 1];
  const int64_t rows = xd[0];
  const int64_t pairs = rows * choices;
  const int64_t inputs = xd[1];
  const int64_t groups = inputs / kGroup;
  if (words * 8 != inputs || inputs % kGroup != 0 || sd[sd.size() - 1] != groups ||
      sd[sd.size() - 2] != outputs || sd[sd.size() - 3] != experts ||
      (stacked && sd[0] != num_layers)) {
    return ffi::Error::InvalidArgument(
        "int4_matvec: shapes disagree: x [P, " + std::to_string(inputs) + "], packed words " +
        std::to_string(words) + " per row (need I/8), group size must be 32");
  }
  const int32_t layer_index = *layer.typed_data();
  if (layer_index < 0 || layer_index >= num_layers) {
    return ffi::Error::InvalidArgument("int4_matvec: layer index out of range");
  }

  Job job;
  job.kernels = &KernelsFor(isa);
  job.outputs = outputs;
  job.inputs = inputs;
  job.groups = groups;
  job.choices = choices;
  const int64_t layer_experts = layer_index * experts;
  job.bytes = reinterpret_cast<const uint8_t*>(packed.typed_data()) +
               layer_experts * outputs * (inputs / 2);
  job.scales = reinterpret_cast<const uint16_t*>(scale.typed_data()) +
                layer_experts * outputs * groups;
  job.y = y->typed_data();

  // Pairs routed elsewhere (negative or out-of-range ids) contribute zero rows.
  std::memset(job.y, 0, sizeof(float) * pairs * outputs);
  const int32_t* ids = expert_ids.typed_data();
  std::vector<int64_t> count(experts + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    if (ids[p] >= 0 && ids[p] < experts) ++count[ids[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) count[e + 1] += count[e];
  job.order.resize(count[experts]);
  {
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) {
      if (ids[p] >= 0 && ids[p] < experts) job.order[fill[ids[p]]++] = p;
    }
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (count[e + 1] == count[e]) continue;
    for (int64_t r = 0; r < outputs; r += kRowsPerItem) {
      job.items.push_back({e, r, std::min(outputs, r + kRowsPerItem), count[e], count[e + 1]});
    }
  }
  if (job.items.empty()) return ffi::Error::Success();

  std::vector<float> x_perm(rows * inputs);
  PermuteInputs(x.typed_data(), rows, inputs, x_perm.data());
  job.x_perm = x_perm.data();

  k2jax::ParallelFor(pool, static_cast<int64_t>(job.items.size()),
                     [&job](int64_t i) { job.RunItem(job.items[i]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K2jaxInt4Matvec, Int4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("choices"));

// The instruction set `isa = 0` runs on this CPU (a k2jax::Isa value), for every k2jax kernel.
extern "C" int32_t K2jaxBestIsa() { return k2jax::BestIsa(); }
