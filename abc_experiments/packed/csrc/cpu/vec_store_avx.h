// Vectorised tile stores shared by the AVX2 and AVX-512 policies (included inside each policy's
// target region). No include guard on purpose.

// Four rows of 8 floats -> u0..u3, where 128-bit half h of u_k holds column 4h + k of the four
// rows, in row order (two 4x4 transposes side by side).
static inline void transpose4x4_halves(__m256 q0, __m256 q1, __m256 q2, __m256 q3, __m256& u0, __m256& u1,
                                       __m256& u2, __m256& u3) {
  const __m256 t0 = _mm256_unpacklo_ps(q0, q1), t1 = _mm256_unpackhi_ps(q0, q1);
  const __m256 t2 = _mm256_unpacklo_ps(q2, q3), t3 = _mm256_unpackhi_ps(q2, q3);
  u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}

static inline void transpose8x8_ps(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5,
                                   __m256& r6, __m256& r7) {
  __m256 u0, u1, u2, u3, u4, u5, u6, u7;
  transpose4x4_halves(r0, r1, r2, r3, u0, u1, u2, u3);
  transpose4x4_halves(r4, r5, r6, r7, u4, u5, u6, u7);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The epilogue's vector widths (cpu/epilogue.h): 4 and 8 consecutive outputs of one channel.
struct Lanes4 {
  using T = __m128;
  static inline T load(const float* p) { return _mm_loadu_ps(p); }
  static inline T add(T x, T y) { return _mm_add_ps(x, y); }
  static inline T relu(T x) { return _mm_max_ps(x, _mm_setzero_ps()); }
  static inline void store(float* p, T x) { _mm_storeu_ps(p, x); }
};
struct Lanes8 {
  using T = __m256;
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline T add(T x, T y) { return _mm256_add_ps(x, y); }
  static inline T relu(T x) { return _mm256_max_ps(x, _mm256_setzero_ps()); }
  static inline void store(float* p, T x) { _mm256_storeu_ps(p, x); }
};

// rows[j] (j < count): the positions ox0... of output channel co0 + j.
template <class Lanes>
static inline void store_rows(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t co0, int64_t count,
                              const typename Lanes::T (&rows)[8]) {
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // unrolled: rows[j] stays in registers
    if (j >= count) break;
    const int64_t co = co0 + j;
    epilogue<Lanes>(a, b * a.o_b + co * a.o_co + oy * a.o_y + ox0, a.bterm + co * a.e_co + oy * a.e_y + ox0, rows[j]);
  }
}

// Returns false when the generic scalar store must do it.
static inline bool store8x8_avx(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t co0, int64_t np,
                                int64_t nco, int64_t P, const float* tile, int64_t tile_stride) {
  if (a.o_co == 1 && a.e_co == 1) {  // channels contiguous (a linear layer, a channels-last conv): no transpose
    const int64_t full = nco / 8 * 8;
    for (int64_t p = 0; p < np; ++p) {
      const int64_t at = b * a.o_b + oy * a.o_y + (ox0 + p) * a.o_x + co0;
      const float* e = a.bterm + oy * a.e_y + (ox0 + p) * a.e_x + co0;
      const float* t = tile + p * tile_stride;
      for (int64_t j = 0; j < full; j += 8) epilogue<Lanes8>(a, at + j, e + j, _mm256_loadu_ps(t + j));
      for (int64_t j = full; j < nco; ++j) epilogue<Scalar>(a, at + j, e + j, t[j]);
    }
    return true;
  }
  if (a.o_x != 1 || a.e_x != 1 || np != P) return false;
  if (P == 4) {  // 4 positions x 8 channels: two 4x4 transposes (low and high channel halves)
    for (int64_t j0 = 0; j0 < nco; j0 += 8) {
      __m256 u0, u1, u2, u3;  // half h of u_k: channel 4h + k at the 4 positions
      transpose4x4_halves(_mm256_loadu_ps(tile + 0 * tile_stride + j0), _mm256_loadu_ps(tile + 1 * tile_stride + j0),
                          _mm256_loadu_ps(tile + 2 * tile_stride + j0), _mm256_loadu_ps(tile + 3 * tile_stride + j0),
                          u0, u1, u2, u3);
      const __m128 rows[8] = {_mm256_castps256_ps128(u0), _mm256_castps256_ps128(u1), _mm256_castps256_ps128(u2),
                              _mm256_castps256_ps128(u3), _mm256_extractf128_ps(u0, 1), _mm256_extractf128_ps(u1, 1),
                              _mm256_extractf128_ps(u2, 1), _mm256_extractf128_ps(u3, 1)};
      store_rows<Lanes4>(a, b, oy, ox0, co0 + j0, nco - j0 < 8 ? nco - j0 : 8, rows);
    }
    return true;
  }
  if (P != 8) return false;
  for (int64_t j0 = 0; j0 < nco; j0 += 8) {
    __m256 r0 = _mm256_loadu_ps(tile + 0 * tile_stride + j0), r1 = _mm256_loadu_ps(tile + 1 * tile_stride + j0);
    __m256 r2 = _mm256_loadu_ps(tile + 2 * tile_stride + j0), r3 = _mm256_loadu_ps(tile + 3 * tile_stride + j0);
    __m256 r4 = _mm256_loadu_ps(tile + 4 * tile_stride + j0), r5 = _mm256_loadu_ps(tile + 5 * tile_stride + j0);
    __m256 r6 = _mm256_loadu_ps(tile + 6 * tile_stride + j0), r7 = _mm256_loadu_ps(tile + 7 * tile_stride + j0);
    transpose8x8_ps(r0, r1, r2, r3, r4, r5, r6, r7);  // r_j: 8 positions of channel co0 + j0 + j
    const __m256 rows[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
    store_rows<Lanes8>(a, b, oy, ox0, co0 + j0, nco - j0 < 8 ? nco - j0 : 8, rows);
  }
  return true;
}

// What the AVX2 and AVX-512 policies share: binarizing 8 inputs against a threshold, and the
// vectorised tile store. Each policy's struct V derives from this.
struct AvxCommon : PackedLayout {
  static inline uint32_t cmp8(const float* x, float v) {
    const __m256 s = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_set1_ps(v));
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(0.5f), _CMP_GE_OQ)));
  }
  static inline bool store8x8(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t co0, int64_t np,
                              int64_t nco, int64_t P, const float* tile, int64_t ts) {
    return store8x8_avx(a, b, oy, ox0, co0, np, nco, P, tile, ts);
  }
};
