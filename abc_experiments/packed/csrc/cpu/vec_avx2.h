// AVX2 policy: the popcount by nibble lookup (VPSHUFB) into byte counters, summed by VPSADBW only
// when folded or spilled, on operands split into their nibbles once per call.
//
// popcount(w ^ a) = popcount(lo(w) ^ lo(a)) + popcount(hi(w) ^ hi(a)), where lo(x) = x & 0x0f..0f
// and hi(x) = (x >> 4) & 0x0f..0f: the split commutes with the xor. layout() splits every weight
// and activation word once per call into two words of their own, [lo, hi] (so the kernel sees
// Wc' = 2 Wc words per pixel), which leaves 3 vector operations per 4 output channels and split
// word in the loop (xor, shuffle, byte addition) instead of 4 per whole word (xor, and, shift,
// and, 2 shuffles, 2 additions = 8 per 2 halves): the loop's ceiling rises by a third. A step
// holds only the half word's 2 weight registers and 1 broadcast, so 4 positions' counters (8 ymm)
// stay in the 16 registers with no spill. The counts are the same integers, so the outputs are
// the same bits as on every other path. Included inside kernels.cpp's avx2 target region.
#include "vec_store_avx.h"  // (<memory>: kernels.cpp includes it before the target regions)

struct V : AvxCommon {
  struct Wv { __m256i w03, w47; };            // one nibble half of 8 channels' words
  struct Av { __m256i a; };
  struct Cv { __m256i lo, hi; };  // byte counters of channels 0-3 and 4-7
  static constexpr int64_t kSpan = 63;  // a byte gains at most 4 per step: 63 * 4 = 252 < 256

  static constexpr uint64_t kNibbles = 0x0F0F0F0F0F0F0F0FULL;
  struct Operands { std::unique_ptr<uint64_t[]> xp, wk; };  // not zero-filled: every word is written
  // xp (B, Hp, Wp, N, Wc) -> (..., Wc, 2): [lo, hi] per word; wk (M, COB, kh, kw, Wc, 8) ->
  // (..., Wc, 2, 8): the 8 channels' lo nibbles, then their hi nibbles; Wc -> 2 Wc.
  static ConvArgs layout(const ConvArgs& a, Operands& o) {
    const int64_t words = a.B * a.Hp * a.Wp * a.N * a.Wc, groups = a.M * a.COB * a.kh * a.kw * a.Wc;
    o.xp = std::make_unique_for_overwrite<uint64_t[]>(2 * words);
    o.wk = std::make_unique_for_overwrite<uint64_t[]>(16 * groups);
    uint64_t* xs = o.xp.get();
    at::parallel_for(0, words, kSplitGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        xs[2 * i] = a.xp[i] & kNibbles;
        xs[2 * i + 1] = (a.xp[i] >> 4) & kNibbles;
      }
    });
    for (int64_t g = 0; g < groups; ++g)
      for (int l = 0; l < 8; ++l) {
        o.wk[16 * g + l] = a.wk[8 * g + l] & kNibbles;
        o.wk[16 * g + 8 + l] = (a.wk[8 * g + l] >> 4) & kNibbles;
      }
    ConvArgs split = a;
    split.xp = o.xp.get();
    split.wk = o.wk.get();
    split.Wc = 2 * a.Wc;
    return split;
  }

  static inline __m256i load(const uint64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline Wv load_w(const uint64_t* p) { return {load(p), load(p + 4)}; }
  static inline Av bcast(const uint64_t* p) { return {_mm256_set1_epi64x(static_cast<long long>(p[0]))}; }
  static inline Cv czero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static inline __m256i lut() {
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  }
  static inline void step(Cv& acc, const Wv& w, const Av& a) {  // no horizontal sum per step
    const __m256i t = lut();
    acc.lo = _mm256_add_epi8(acc.lo, _mm256_shuffle_epi8(t, _mm256_xor_si256(w.w03, a.a)));
    acc.hi = _mm256_add_epi8(acc.hi, _mm256_shuffle_epi8(t, _mm256_xor_si256(w.w47, a.a)));
  }
  static inline __m256i sums64(__m256i bytes) { return _mm256_sad_epu8(bytes, _mm256_setzero_si256()); }
  static inline void spill(uint64_t* total, Cv& acc) {
    __m256i* t = reinterpret_cast<__m256i*>(total);
    _mm256_storeu_si256(t, _mm256_add_epi64(_mm256_loadu_si256(t), sums64(acc.lo)));
    _mm256_storeu_si256(t + 1, _mm256_add_epi64(_mm256_loadu_si256(t + 1), sums64(acc.hi)));
    acc = czero();
  }
  static inline void fold(float* t, const float* c, const Cv& acc, float half_k, bool first) {
    // the counts are < 256 * 8: keep the low 32 bits of each 64-bit lane
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(sums64(acc.lo), even));
    const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(sums64(acc.hi), even));
    const __m256 counts = _mm256_sub_ps(
        _mm256_cvtepi32_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1)), _mm256_set1_ps(half_k));
    _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_loadu_ps(c), counts, first ? _mm256_setzero_ps() : _mm256_loadu_ps(t)));
  }
  // 16 ymm registers: each counter takes two, a step's weights two, its broadcast one, plus the
  // lookup table. 3 planes: 2 positions (12 counter registers) instead of 1 halve the weight loads
  // and the tiles (ABC(3,3) 64-64 3x3 32x32: 0.57-0.60x -> 0.80-0.82x F.conv2d).
  template <int NN> struct Cfg;
};
template <> struct V::Cfg<1> { static constexpr int CB = 1, P = 4; };
template <> struct V::Cfg<2> { static constexpr int CB = 1, P = 2; };
template <> struct V::Cfg<3> { static constexpr int CB = 1, P = 2; };
template <> struct V::Cfg<4> { static constexpr int CB = 1, P = 1; };
template <> struct V::Cfg<5> { static constexpr int CB = 1, P = 1; };
