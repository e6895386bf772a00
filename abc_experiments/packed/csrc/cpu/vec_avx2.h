// AVX2 policy: two ymm hold the same 64-bit word of 8 output channels; popcount by the nibble
// lookup (VPSHUFB) into byte counters, summed by VPSADBW only when folded or spilled. Included inside kernels.cpp's avx2 target region.
#include "vec_store_avx.h"

struct V : AvxCommon {
  struct Wv { __m256i lo, hi; };
  using Av = __m256i;
  struct Cv { __m256i lo, hi; };  // byte counters: each byte counts the ones of its byte position
  static constexpr int64_t kSpan = 31;  // a byte gains at most 8 per step: 31 * 8 = 248 < 256
  static inline Wv load_w(const uint64_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4))};
  }
  static inline Av bcast(uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
  static inline Cv czero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static inline __m256i popcount8(__m256i x) {  // per byte
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
    const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
    return _mm256_add_epi8(lo, hi);
  }
  static inline void step(Cv& acc, const Wv& w, const Av& a) {  // no horizontal sum per step
    acc.lo = _mm256_add_epi8(acc.lo, popcount8(_mm256_xor_si256(w.lo, a)));
    acc.hi = _mm256_add_epi8(acc.hi, popcount8(_mm256_xor_si256(w.hi, a)));
  }
  static inline __m256i sums64(__m256i bytes) { return _mm256_sad_epu8(bytes, _mm256_setzero_si256()); }
  static inline void spill(uint64_t* total, Cv& acc) {
    __m256i* t = reinterpret_cast<__m256i*>(total);
    _mm256_storeu_si256(t, _mm256_add_epi64(_mm256_loadu_si256(t), sums64(acc.lo)));
    _mm256_storeu_si256(t + 1, _mm256_add_epi64(_mm256_loadu_si256(t + 1), sums64(acc.hi)));
    acc = czero();
  }
  static inline void fold(float* t, const float* c, const Cv& acc, float half_k) {
    // the counts are < 256 * 8: keep the low 32 bits of each 64-bit lane
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(sums64(acc.lo), even));
    const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(sums64(acc.hi), even));
    const __m256 counts = _mm256_sub_ps(
        _mm256_cvtepi32_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1)), _mm256_set1_ps(half_k));
    _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_loadu_ps(c), counts, _mm256_loadu_ps(t)));
  }
  // 16 ymm registers: each counter takes two, plus weights, lookup table, mask and temporaries.
  template <int NN> struct Cfg;
};
template <> struct V::Cfg<1> { static constexpr int CB = 1, P = 4; };
template <> struct V::Cfg<2> { static constexpr int CB = 1, P = 2; };
template <> struct V::Cfg<3> { static constexpr int CB = 1, P = 1; };
template <> struct V::Cfg<4> { static constexpr int CB = 1, P = 1; };
template <> struct V::Cfg<5> { static constexpr int CB = 1, P = 1; };
