// The AVX-512 policy (vec_avx512.h, unchanged) compiled with the eight AVX-512 intrinsics it uses
// replaced by plain C++ on eight 64-bit lanes, so that its code (register blocking, counter
// folding, the shared kernel body at its AVX-512 configuration) runs and is tested exactly on CPUs
// without AVX-512; its stores and binarization are the real AVX2 code. For tests, not for speed:
// never picked by "auto". Included inside kernels.cpp's avx2 target region, in its own namespace,
// where these declarations hide the global intrinsics of the same names (std::memcpy: kernels.cpp
// includes <cstring> first). No include guard.

struct M512iEmulated {
  uint64_t lane[8];
};
using __m512i = M512iEmulated;

static inline __m512i _mm512_loadu_si512(const void* p) {
  __m512i r;
  std::memcpy(r.lane, p, sizeof r.lane);
  return r;
}
static inline void _mm512_storeu_si512(void* p, __m512i a) { std::memcpy(p, a.lane, sizeof a.lane); }
static inline __m512i _mm512_set1_epi64(long long x) {
  __m512i r;
  for (auto& v : r.lane) v = static_cast<uint64_t>(x);
  return r;
}
static inline __m512i _mm512_setzero_si512() { return _mm512_set1_epi64(0); }
static inline __m512i _mm512_xor_si512(__m512i a, __m512i b) {
  for (int i = 0; i < 8; ++i) a.lane[i] ^= b.lane[i];
  return a;
}
static inline __m512i _mm512_add_epi64(__m512i a, __m512i b) {
  for (int i = 0; i < 8; ++i) a.lane[i] += b.lane[i];
  return a;
}
static inline __m512i _mm512_popcnt_epi64(__m512i a) {
  for (auto& v : a.lane) v = static_cast<uint64_t>(__builtin_popcountll(v));
  return a;
}
static inline __m256 _mm512_cvtepu64_ps(__m512i a) {
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(a.lane[i]);
  return _mm256_load_ps(f);
}

#include "vec_avx512.h"
