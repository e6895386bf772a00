// All kernel paths of the packed ABC layers in ONE translation unit: the same kernel body
// (cpu/kernel_body.h) compiled three times, each inside its own namespace and GCC target region
// with its vector policy (cpu/vec_avx512.h, cpu/vec_avx2.h, cpu/vec_portable.h), and a fourth
// time, for tests, as the AVX-512 policy with its AVX-512 intrinsics emulated on AVX2
// (cpu/vec_avx512_emulated.h), so that the AVX-512 code is checked on any AVX2 CPU. No special
// compiler flags are needed; the path is chosen at run time (register.cpp checks the CPU).
// All headers are included before the target regions so that no library inline function is
// compiled for a wider ISA than the caller's CPU may have.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ABC_PACKED_X86 1
#endif

#include "packed_ops.h"

namespace abc_packed {

namespace portable {
#include "cpu/epilogue.h"
#include "cpu/vec_portable.h"
#include "cpu/kernel_body.h"
}  // namespace portable

#if ABC_PACKED_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
namespace avx2 {
#include "cpu/epilogue.h"
#include "cpu/vec_avx2.h"
#include "cpu/kernel_body.h"
}  // namespace avx2
namespace avx512_emulated {  // the AVX-512 policy on AVX2 hardware, for tests (see the header)
#include "cpu/epilogue.h"
#include "cpu/vec_avx512_emulated.h"
#include "cpu/kernel_body.h"
}  // namespace avx512_emulated
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx2,fma,popcnt")
namespace avx512 {
#include "cpu/epilogue.h"
#include "cpu/vec_avx512.h"
#include "cpu/kernel_body.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

int cpu_features() {
  int features = 0;
#if ABC_PACKED_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) features |= 1;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    features |= 2;
#endif
  return features;
}

#if ABC_PACKED_X86
#define ABC_DISPATCH(isa, call)                             \
  switch (isa) {                                            \
    case Isa::kAvx512: return avx512::call;                 \
    case Isa::kAvx2: return avx2::call;                     \
    case Isa::kAvx512Emulated: return avx512_emulated::call; \
    default: return portable::call;                         \
  }
#else
#define ABC_DISPATCH(isa, call) return portable::call;
#endif

// Plain C++ on every path: a few word operations per kernel row and position, next to the
// convolution's Wr popcounts per output channel.
void concat_taps(const TapArgs& a) {
  if (a.Wc == 1 && a.Wr <= 2) {  // up to 64 channels, a kernel row in at most 128 bits: the common case
    at::parallel_for(0, a.rows, kTapRowsGrain, [&](int64_t r0, int64_t r1) {
      const int64_t step = a.dw * a.N;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n = 0; n < a.N; ++n) {
          const uint64_t* src = a.in + r * a.Wp * a.N + n;
          uint64_t* dst = a.out + (r * a.Wq * a.N + n) * a.Wr;
          for (int64_t x = 0; x < a.Wq; ++x, src += a.N, dst += a.N * a.Wr) {
            unsigned __int128 row = 0;
            for (int64_t kx = 0; kx < a.kw; ++kx) row |= static_cast<unsigned __int128>(src[kx * step]) << (kx * a.C);
            dst[0] = static_cast<uint64_t>(row);
            if (a.Wr == 2) dst[1] = static_cast<uint64_t>(row >> 64);
          }
        }
    });
    return;
  }
  at::parallel_for(0, a.rows, kTapRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t x = 0; x < a.Wq; ++x)
        for (int64_t n = 0; n < a.N; ++n) {
          uint64_t* dst = a.out + ((r * a.Wq + x) * a.N + n) * a.Wr;
          for (int64_t kx = 0; kx < a.kw; ++kx) {
            const uint64_t* src = a.in + ((r * a.Wp + x + kx * a.dw) * a.N + n) * a.Wc;
            for (int64_t j = 0; j < a.Wc; ++j) {
              const int64_t bits = a.C - 64 * j < 64 ? a.C - 64 * j : 64, off = kx * a.C + 64 * j;
              const int64_t w = off >> 6, s = off & 63;
              dst[w] |= src[j] << s;  // the word's unused high bits are 0
              if (s + bits > 64) dst[w + 1] |= src[j] >> (64 - s);
            }
          }
        }
  });
}

void pack_nchw(Isa isa, const PackArgs& args) { ABC_DISPATCH(isa, pack_nchw_impl(args)) }
void pack_rows(Isa isa, const RowPackArgs& args) { ABC_DISPATCH(isa, pack_rows_impl(args)) }
void conv(Isa isa, const ConvArgs& args) { ABC_DISPATCH(isa, conv_impl(args)) }

}  // namespace abc_packed
