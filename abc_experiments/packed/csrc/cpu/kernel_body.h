// The packed ABC kernels, written once against a small vector policy `V` and included by
// kernels.cpp once per ISA, each time inside its own namespace and `#pragma GCC target` region
// (so the AVX-512, AVX2 and portable paths share every loop and index computation and differ only
// in the policy's handful of vector operations; see vec_*.h). No include guard on purpose.
//
// The policy V provides:
//   ConvArgs layout(const ConvArgs&, Operands&)   the arguments with xp, wk and Wc in the
//                                         policy's operand layout, still one u64 per word and 8
//                                         per word of 8 channels (the identity for the packed
//                                         layout; AVX2 splits every word into 2 nibble words, Wc
//                                         -> 2 Wc; Operands owns the copies)
//   Wv load_w(const uint64_t* p)          the same word of 8 output channels (8 consecutive u64)
//   Av bcast(const uint64_t* p)           one activation word, broadcast
//   Cv czero(); void step(Cv&, Wv, Av)    8 popcount counters; counter += popcount(w ^ a) per lane
//   kSpan                                 how many steps the counters hold (AVX2 counts in bytes: 63)
//   void spill(uint64_t* total, Cv&)      total[l] += counter[l], counters to 0 (every kSpan steps)
//   void fold(float* t, const float* c, const Cv&, float h, bool first)
//                                         t[l] = fma(c[l], counter[l] - h, first ? 0 : t[l]), l < 8
//   uint32_t cmp8(const float* x, float v)           bit i = (x[i] + v >= 0.5f), i < 8
//   bool store8x8(...)                    optional fast transposed store (see below)
//   template <int NN> struct Cfg { CB, P }   register blocking: CB blocks of 8 output channels
//                                         times P output positions times NN activation planes

// 8x8 bit-matrix transpose: bit 8r + c -> bit 8c + r (Hacker's Delight, transpose8rS64).
static inline uint64_t transpose8(uint64_t x) {
  uint64_t t;
  t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
  x = x ^ t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
  x = x ^ t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
  x = x ^ t ^ (t << 28);
  return x;
}

// ---- binarize-and-pack, NCHW input (one pass: compare 8 pixels of 8 channels, transpose bits) ----
static void pack_nchw_rows(const PackArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.H, W = a.W, C = a.C, N = a.N, Wc = a.Wc, HW = H * W;
  const int64_t groups = (C + 7) / 8, pix_bytes = N * Wc * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, y = r % H;
    uint8_t* orow = reinterpret_cast<uint8_t*>(a.out + ((b * a.Hp + y + a.ph) * a.Wp + a.pw) * N * Wc);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = 8 * g, nc = C - c0 < 8 ? C - c0 : 8;
      const float* xs = a.x + ((b * C + c0) * H + y) * W;
      int64_t x0 = 0;
      for (; x0 + 8 <= W; x0 += 8) {
        for (int64_t n = 0; n < N; ++n) {
          const float v = a.shifts[n];
          uint64_t t = 0;
          for (int64_t c = 0; c < nc; ++c) t |= static_cast<uint64_t>(V::cmp8(xs + c * HW + x0, v)) << (8 * c);
          t = transpose8(t);  // byte j: the 8 channel bits of pixel x0 + j
          uint8_t* o = orow + x0 * pix_bytes + n * Wc * 8 + g;
          for (int j = 0; j < 8; ++j) o[j * pix_bytes] = static_cast<uint8_t>(t >> (8 * j));
        }
      }
      for (; x0 < W; ++x0) {
        for (int64_t n = 0; n < N; ++n) {
          const float v = a.shifts[n];
          uint32_t byte = 0;
          for (int64_t c = 0; c < nc; ++c) byte |= static_cast<uint32_t>(xs[c * HW + x0] + v >= 0.5f) << c;
          orow[x0 * pix_bytes + n * Wc * 8 + g] = static_cast<uint8_t>(byte);
        }
      }
    }
  }
}

// ---- binarize-and-pack, NHWC input (channels_last: a pixel's channels contiguous, no transpose) ----
static void pack_nhwc_rows(const PackArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.H, W = a.W, C = a.C, N = a.N, Wc = a.Wc, full = C / 8;
  const int64_t pix_bytes = N * Wc * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, y = r % H;
    uint8_t* orow = reinterpret_cast<uint8_t*>(a.out + ((b * a.Hp + y + a.ph) * a.Wp + a.pw) * N * Wc);
    const float* xrow = a.x + (b * H + y) * W * C;
    for (int64_t x = 0; x < W; ++x) {
      const float* xs = xrow + x * C;
      for (int64_t n = 0; n < N; ++n) {
        const float v = a.shifts[n];
        uint8_t* o = orow + x * pix_bytes + n * Wc * 8;
        for (int64_t g = 0; g < full; ++g) o[g] = static_cast<uint8_t>(V::cmp8(xs + 8 * g, v));
        if (C % 8) {
          uint32_t byte = 0;
          for (int64_t c = 8 * full; c < C; ++c) byte |= static_cast<uint32_t>(xs[c] + v >= 0.5f) << (c - 8 * full);
          o[full] = static_cast<uint8_t>(byte);
        }
      }
    }
  }
}

static void pack_nchw_impl(const PackArgs& a) {
  const auto rows = a.channels_last ? pack_nhwc_rows : pack_nchw_rows;  // chosen once, not per task
  at::parallel_for(0, a.B * a.H, kPackRowsGrain, [&](int64_t r0, int64_t r1) { rows(a, r0, r1); });
}

// ---- binarize-and-pack, row-major (R, F) input (channels already contiguous: no transpose) ----
static void pack_rows_range(const RowPackArgs& a, int64_t r0, int64_t r1) {
  const int64_t F = a.F, N = a.N, Wc = a.Wc, full = F / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = a.x + r * F;
    for (int64_t n = 0; n < N; ++n) {
      const float v = a.shifts[n];
      uint8_t* o = reinterpret_cast<uint8_t*>(a.out + (r * N + n) * Wc);
      for (int64_t g = 0; g < full; ++g) o[g] = static_cast<uint8_t>(V::cmp8(xr + 8 * g, v));
      if (F % 8) {
        uint32_t byte = 0;
        for (int64_t c = 8 * full; c < F; ++c) byte |= static_cast<uint32_t>(xr[c] + v >= 0.5f) << (c - 8 * full);
        o[full] = static_cast<uint8_t>(byte);
      }
    }
  }
}

static void pack_rows_impl(const RowPackArgs& a) {
  const int64_t grain = a.F * a.N >= kRowPackWide ? kRowPackWideGrain : kRowPackNarrowGrain;
  at::parallel_for(0, a.R, grain, [&](int64_t r0, int64_t r1) { pack_rows_range(a, r0, r1); });
}

// ---- binary convolution ----
// (always inlined: a call taking the counters by reference would keep them in memory, not registers)
template <int CB, int P, int NN>
__attribute__((always_inline)) static inline void spill_all(uint64_t (&total)[CB][P][NN][8],
                                                            typename V::Cv (&acc)[CB][P][NN]) {
#pragma GCC unroll 32
  for (int cb = 0; cb < CB; ++cb)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 32
      for (int nn = 0; nn < NN; ++nn) V::spill(total[cb][p][nn], acc[cb][p][nn]);
}

// One register tile: CB blocks of 8 output channels x P output positions x NN activation planes,
// for one weight basis m; one pass over the receptive field, all CB*P*NN popcount counters in
// registers, then folded into the float tile with -2 alpha_m beta_n.
// `first`: the tile's first (m, n0): the folds write the tile instead of adding to it (a tile
// zeroed first gives the same bits: fma(c, x, +0), as here).
template <int CB, int P, int NN>
static inline void micro(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t cob, int64_t m,
                         int64_t n0, float* tile, int64_t tile_stride, bool first) {
  typename V::Cv acc[CB][P][NN];
#pragma GCC unroll 32
  for (int cb = 0; cb < CB; ++cb)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 32
      for (int nn = 0; nn < NN; ++nn) acc[cb][p][nn] = V::czero();
  const int64_t Wc = a.Wc, NW = a.N * Wc;  // NW: u64 per activation pixel
  const int64_t wblock = a.kh * a.kw * Wc * 8;  // between consecutive blocks of 8 output channels
  const uint64_t* wbase = a.wk + (m * a.COB + cob) * wblock;
  int64_t ix[P];
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p) ix[p] = (ox0 + p < a.OW ? ox0 + p : a.OW - 1) * a.sw;  // tail: repeat the last
  // More steps than the counters hold: spill them into 64-bit totals every kSpan steps (the
  // countdown reaches 0 only then, so short reductions pay one decrement per step).
  const bool spilled = a.kh * a.kw * Wc >= V::kSpan;  // (exactly kSpan: the loop spills at the last step)
  alignas(64) uint64_t total[CB][P][NN][8];
  if (spilled) std::memset(total, 0, sizeof total);
  int64_t left = V::kSpan;
  const int64_t taps = a.kw * Wc;  // words per kernel row, each at offset a.taps[j] from a position's first
  for (int64_t ky = 0; ky < a.kh; ++ky) {
    const uint64_t* row = a.xp + ((b * a.Hp + oy * a.sh + ky * a.dh) * a.Wp) * NW + n0 * Wc;
    const uint64_t* ap[P];
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) ap[p] = row + ix[p] * NW;
    const uint64_t* wp = wbase + ky * taps * 8;
    for (int64_t j = 0; j < taps; ++j) {
      const int64_t off = a.taps[j];
      typename V::Wv w[CB];
#pragma GCC unroll 32
      for (int cb = 0; cb < CB; ++cb) w[cb] = V::load_w(wp + cb * wblock + j * 8);
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 32
        for (int nn = 0; nn < NN; ++nn) {
          const typename V::Av av = V::bcast(ap[p] + off + nn * Wc);
#pragma GCC unroll 32
          for (int cb = 0; cb < CB; ++cb) V::step(acc[cb][p][nn], w[cb], av);
        }
      if (--left == 0) {
        spill_all<CB, P, NN>(total, acc);
        left = V::kSpan;
      }
    }
  }
  if (spilled) spill_all<CB, P, NN>(total, acc);
#pragma GCC unroll 32
  for (int cb = 0; cb < CB; ++cb)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 32
      for (int nn = 0; nn < NN; ++nn) {
        float* t = tile + p * tile_stride + cb * 8;
        const float* c = a.coef + ((m * a.N + n0 + nn) * a.COB + cob + cb) * 8;
        const bool write = first && nn == 0;
        if (!spilled) {
          V::fold(t, c, acc[cb][p][nn], a.half_k, write);
        } else {
          for (int l = 0; l < 8; ++l)  // fused, as V::fold: the same bits on every path
            t[l] = std::fma(c[l], static_cast<float>(total[cb][p][nn][l]) - a.half_k, write ? 0.f : t[l]);
        }
      }
}

template <int CB, int P, int NNMAX>
static inline void micro_planes(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t cob, int64_t m,
                                int64_t n0, int64_t nn, float* tile, int64_t tile_stride, bool first) {
  if constexpr (NNMAX > 1) {
    if (nn < NNMAX) return micro_planes<CB, P, NNMAX - 1>(a, b, oy, ox0, cob, m, n0, nn, tile, tile_stride, first);
  }
  micro<CB, P, NNMAX>(a, b, oy, ox0, cob, m, n0, tile, tile_stride, first);
}

// tile (P positions x cbn*8 channels, position-major) -> out through the epilogue (cpu/epilogue.h)
static inline void store_tile(const ConvArgs& a, int64_t b, int64_t oy, int64_t ox0, int64_t cob, int64_t cbn,
                              int64_t P, const float* tile) {
  const int64_t np = a.OW - ox0 < P ? a.OW - ox0 : P;
  const int64_t co0 = cob * 8, nco = a.Cout - co0 < cbn * 8 ? a.Cout - co0 : cbn * 8;
  const int64_t tile_stride = cbn * 8;
  if (V::store8x8(a, b, oy, ox0, co0, np, nco, P, tile, tile_stride)) return;
  const int64_t row = b * a.o_b + oy * a.o_y;
  const float* eb = a.bterm + oy * a.e_y;
  for (int64_t j = 0; j < nco; ++j) {
    const int64_t co = co0 + j;
    for (int64_t p = 0; p < np; ++p)
      epilogue<Scalar>(a, row + co * a.o_co + (ox0 + p) * a.o_x, eb + co * a.e_co + (ox0 + p) * a.e_x,
                       tile[p * tile_stride + j]);
  }
}

template <int NNMAX>
static void conv_tasks(const ConvArgs& args, int64_t ncog, int64_t t0, int64_t t1) {
  const ConvArgs a = args;  // a local copy: the output stores cannot alias it, so its fields stay in registers
  constexpr int CB = V::template Cfg<NNMAX>::CB, P = V::template Cfg<NNMAX>::P;
  alignas(64) float tile[P * CB * 8];
  const int64_t per_group = (a.COB + ncog - 1) / ncog;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t cog = t % ncog, row = t / ncog, b = row / a.OH, oy = row % a.OH;
    const int64_t cb_lo = cog * per_group, cb_hi = cb_lo + per_group < a.COB ? cb_lo + per_group : a.COB;
    for (int64_t ox0 = 0; ox0 < a.OW; ox0 += P) {
      for (int64_t cob = cb_lo; cob < cb_hi;) {
        const int64_t cbn = cb_hi - cob >= CB ? CB : 1;
        const int64_t stride = cbn * 8;
        for (int64_t m = 0; m < a.M; ++m) {
          for (int64_t n0 = 0; n0 < a.N; n0 += NNMAX) {
            const int64_t nn = a.N - n0 < NNMAX ? a.N - n0 : NNMAX;
            const bool first = m == 0 && n0 == 0;
            if (cbn == CB)
              micro_planes<CB, P, NNMAX>(a, b, oy, ox0, cob, m, n0, nn, tile, stride, first);
            else
              micro_planes<1, P, NNMAX>(a, b, oy, ox0, cob, m, n0, nn, tile, stride, first);
          }
        }
        store_tile(a, b, oy, ox0, cob, cbn, P, tile);
        cob += cbn;
      }
    }
  }
}

template <int NNMAX>
static void conv_run(const ConvArgs& a) {
  constexpr int CB = V::template Cfg<NNMAX>::CB;
  // Tasks: (image, output row, group of output-channel blocks); split the channels only when
  // there are too few rows to keep every thread busy (linear layers, small maps).
  const int64_t rows = a.B * a.OH, threads = at::get_num_threads();
  int64_t ncog = 1;
  if (rows < kConvTasksPerThread * threads) {
    const int64_t want = (kConvTasksPerThread * threads + rows - 1) / rows, most = (a.COB + CB - 1) / CB;
    ncog = want < most ? want : most;
  }
  at::parallel_for(0, rows * ncog, 1, [&](int64_t t0, int64_t t1) { conv_tasks<NNMAX>(a, ncog, t0, t1); });
}

static void conv_impl(const ConvArgs& args) {
  typename V::Operands operands;
  ConvArgs a = V::layout(args, operands);
  const int64_t taps = a.kw * a.Wc, NW = a.N * a.Wc;
  const auto offsets = std::make_unique_for_overwrite<int64_t[]>(taps);
  for (int64_t j = 0; j < taps; ++j) offsets[j] = (j / a.Wc) * a.dw * NW + j % a.Wc;
  a.taps = offsets.get();
  switch (a.N < 5 ? a.N : 5) {
    case 1: return conv_run<1>(a);
    case 2: return conv_run<2>(a);
    case 3: return conv_run<3>(a);
    case 4: return conv_run<4>(a);
    default: return conv_run<5>(a);  // N > 5: planes in chunks of 5
  }
}
