// All kernel paths of the packed ABC layers in ONE translation unit: the same kernel body
// (cpu/kernel_body.h) compiled three times, each inside its own namespace and GCC target region
// with its vector policy (cpu/vec_avx512.h, cpu/vec_avx2.h, cpu/vec_portable.h). No special
// compiler flags are needed; the path is chosen at run time (register.cpp checks the CPU).
// All headers are included before the target regions so that no library inline function is
// compiled for a wider ISA than the caller's CPU may have.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ABC_PACKED_X86 1
#endif

#include "packed_ops.h"

namespace abc_packed {

namespace portable {
#include "cpu/vec_portable.h"
#include "cpu/kernel_body.h"
}  // namespace portable

#if ABC_PACKED_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
namespace avx2 {
#include "cpu/vec_avx2.h"
#include "cpu/kernel_body.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx2,fma,popcnt")
namespace avx512 {
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
#define ABC_DISPATCH(isa, call)                    \
  switch (isa) {                                   \
    case Isa::kAvx512: return avx512::call;        \
    case Isa::kAvx2: return avx2::call;            \
    default: return portable::call;                \
  }
#else
#define ABC_DISPATCH(isa, call) return portable::call;
#endif

void pack_nchw(Isa isa, const PackArgs& args) { ABC_DISPATCH(isa, pack_nchw_impl(args)) }
void pack_rows(Isa isa, const RowPackArgs& args) { ABC_DISPATCH(isa, pack_rows_impl(args)) }
void conv(Isa isa, const ConvArgs& args) { ABC_DISPATCH(isa, conv_impl(args)) }

}  // namespace abc_packed
