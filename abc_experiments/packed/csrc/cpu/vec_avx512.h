// AVX-512 policy: one zmm holds the same 64-bit word of 8 output channels; VPOPCNTQ counts.
// Included inside kernels.cpp's avx512 target region. No include guard on purpose.
#include "vec_store_avx.h"

struct V : AvxCommon {
  using Wv = __m512i;
  using Av = __m512i;
  using Cv = __m512i;
  static inline Wv load_w(const uint64_t* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }
  static inline Av bcast(const uint64_t* p) { return _mm512_set1_epi64(static_cast<long long>(*p)); }
  static inline Cv czero() { return _mm512_setzero_si512(); }
  static inline void step(Cv& acc, const Wv& w, const Av& a) {
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(w, a)));
  }
  static constexpr int64_t kSpan = int64_t{1} << 40;  // 64-bit counters: never spilled in practice
  static inline void spill(uint64_t* total, Cv& acc) {
    _mm512_storeu_si512(static_cast<void*>(total),
                        _mm512_add_epi64(_mm512_loadu_si512(static_cast<const void*>(total)), acc));
    acc = czero();
  }
  static inline void fold(float* t, const float* c, const Cv& acc, float half_k, bool first) {
    const __m256 counts = _mm256_sub_ps(_mm512_cvtepu64_ps(acc), _mm256_set1_ps(half_k));
    _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_loadu_ps(c), counts, first ? _mm256_setzero_ps() : _mm256_loadu_ps(t)));
  }
  // 32 zmm registers: 16-24 counters, the weights and a broadcast.
  template <int NN> struct Cfg;
};
template <> struct V::Cfg<1> { static constexpr int CB = 2, P = 8; };
template <> struct V::Cfg<2> { static constexpr int CB = 1, P = 8; };
template <> struct V::Cfg<3> { static constexpr int CB = 1, P = 8; };
template <> struct V::Cfg<4> { static constexpr int CB = 1, P = 4; };
template <> struct V::Cfg<5> { static constexpr int CB = 1, P = 4; };
