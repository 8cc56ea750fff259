// What k2jax's XLA:CPU kernels share: work sharing over XLA's intra-op thread pool, the
// instruction sets they are compiled for, and bf16 widening.
//
// ParallelFor: items are claimed through one atomic counter by the calling thread and by tasks
// on the pool. The caller runs items too and then waits only for items some thread has
// claimed, so a pool whose threads are all busy (XLA may run other thunks, or this call may
// itself be on a pool thread) cannot deadlock it: the caller then simply runs every item.
// Tasks that start after the call returned find no items left and touch nothing but the
// shared counters.

#ifndef K2JAX_CSRC_COMMON_H_
#define K2JAX_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

// x86-64 gets AVX2 and AVX-512 kernels beside the portable ones; elsewhere (or built with
// -DK2JAX_PORTABLE_ONLY, which is how that path is checked on x86) only the portable C++.
#if defined(__x86_64__) && !defined(K2JAX_PORTABLE_ONLY)
#define K2JAX_X86 1
#else
#define K2JAX_X86 0
#endif

namespace k2jax {

// CPUs this process may run on. XLA sizes its pool otherwise (8 threads on this 2-CPU VM), and
// more runnable threads than CPUs only add switching (one side-by-side run: attention for 8
// rows at 8K positions, 37.5 ms with 8 threads, 29.9 ms with 2).
inline int64_t AvailableCpus() {
  static const int64_t cpus = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      return static_cast<int64_t>(CPU_COUNT(&set));
    }
#endif
    return static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return cpus;
}

// Threads worth using for one call: the pool's, but no more than the CPUs.
inline int64_t Workers(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), AvailableCpus()));
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_items,
                        const std::function<void(int64_t)>& run_item) {
  if (num_items <= 0) return;
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const std::function<void(int64_t)>* run = nullptr;  // valid while items remain
  };
  auto counters = std::make_shared<Counters>();
  counters->run = &run_item;
  auto drain = [counters, num_items] {
    for (int64_t i = counters->next.fetch_add(1); i < num_items;
         i = counters->next.fetch_add(1)) {
      (*counters->run)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(Workers(pool), num_items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(drain)(drain));
  drain();
  while (counters->done.load(std::memory_order_acquire) < num_items) std::this_thread::yield();
}

// Instruction sets, as the kernels' `isa` attribute names them (0 picks the best this CPU has).
enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline bool Supported(int32_t isa) {
#if K2JAX_X86
  __builtin_cpu_init();
  switch (isa) {
    case kScalar:
      return true;
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f");
    default:
      return false;
  }
#else
  return isa == kScalar;
#endif
}

inline int32_t BestIsa() {
  static const int32_t best = Supported(kAvx512) ? kAvx512 : Supported(kAvx2) ? kAvx2 : kScalar;
  return best;
}

// Resolves the `isa` attribute into *resolved; an error naming `kernel` where this CPU lacks it.
inline xla::ffi::Error ResolveIsa(const char* kernel, int32_t isa, int32_t* resolved) {
  *resolved = isa == kAuto ? BestIsa() : isa;
  if (!Supported(*resolved)) {
    return xla::ffi::Error::InvalidArgument(std::string(kernel) +
                                            ": this CPU lacks instruction set " +
                                            std::to_string(isa));
  }
  return xla::ffi::Error::Success();
}

inline float Bf16ToF32(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float out;
  __builtin_memcpy(&out, &widened, sizeof(out));
  return out;
}

}  // namespace k2jax

#endif  // K2JAX_CSRC_COMMON_H_
