// The one output transform of every kernel path (as Larq Compute Engine's OutputTransform). A
// finished value v of a tile, the binary part sum_{m,n} coef[m, n, co] (popcount - K/2) with any
// following BatchNorm already folded into coef and bterm, becomes
//   out[at] = relu?(bterm[e] + v (+ residual[at]))
// where bterm holds the per-channel bias and, near zero padding, the per-position border term.
// `Lanes` says how many consecutive outputs go at once: Scalar here (one float; every path's
// fallback), Lanes4 / Lanes8 (__m128 / __m256) in vec_store_avx.h. Every width computes the same
// bits: the same additions in the same order, and a ReLU that maps NaN and -0 to +0 like max_ps(v, 0).
// Included by kernels.cpp inside each ISA's namespace, before its policy. No include guard on purpose.

struct Scalar {
  using T = float;
  static inline T load(const float* p) { return *p; }
  static inline T add(T x, T y) { return x + y; }
  static inline T relu(T x) { return x > 0.f ? x : 0.f; }
  static inline void store(float* p, T x) { *p = x; }
};

// `at`: the output's offset from a.out (and the residual's from a.residual: the same shape and
// strides); `e`: the bterm values.
template <class Lanes>
static inline void epilogue(const ConvArgs& a, int64_t at, const float* e, typename Lanes::T v) {
  v = Lanes::add(Lanes::load(e), v);
  if (a.residual) v = Lanes::add(v, Lanes::load(a.residual + at));
  Lanes::store(a.out + at, a.relu ? Lanes::relu(v) : v);
}
