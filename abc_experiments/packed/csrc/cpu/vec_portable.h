// Portable policy: plain C++ on arrays of 8 lanes (the compiler may vectorise it); the reference
// for the loop structure the AVX paths share. No include guard on purpose.

struct V : PackedLayout {
  struct Wv { uint64_t v[8]; };
  using Av = uint64_t;
  struct Cv { uint64_t v[8]; };
  static inline Wv load_w(const uint64_t* p) {
    Wv w;
    for (int l = 0; l < 8; ++l) w.v[l] = p[l];
    return w;
  }
  static inline Av bcast(const uint64_t* p) { return *p; }
  static inline Cv czero() { return Cv{{0, 0, 0, 0, 0, 0, 0, 0}}; }
  static inline uint64_t popcount64(uint64_t x) {  // SWAR: no popcnt instruction needed
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (x * 0x0101010101010101ULL) >> 56;
  }
  static inline void step(Cv& acc, const Wv& w, Av a) {
    for (int l = 0; l < 8; ++l) acc.v[l] += popcount64(w.v[l] ^ a);
  }
  static constexpr int64_t kSpan = int64_t{1} << 40;  // 64-bit counters: never spilled in practice
  static inline void spill(uint64_t* total, Cv& acc) {
    for (int l = 0; l < 8; ++l) total[l] += acc.v[l];
    acc = czero();
  }
  static inline void fold(float* t, const float* c, const Cv& acc, float half_k, bool first) {
    // a fused multiply-add, rounded once as the AVX paths' vfmadd: every path gives the same bits
    for (int l = 0; l < 8; ++l) t[l] = std::fma(c[l], static_cast<float>(acc.v[l]) - half_k, first ? 0.f : t[l]);
  }
  static inline uint32_t cmp8(const float* x, float v) {
    uint32_t bits = 0;
    for (int i = 0; i < 8; ++i) bits |= static_cast<uint32_t>(x[i] + v >= 0.5f) << i;
    return bits;
  }
  static inline bool store8x8(const ConvArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              const float*, int64_t) {
    return false;
  }
  template <int NN> struct Cfg { static constexpr int CB = 1, P = 4; };
};
