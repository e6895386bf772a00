// Shared declarations of the packed ABC kernels (abc_experiments.packed).
//
// Bit conventions (all paths): bit = 1 means +1, bit = 0 means -1. A pixel's C channels are packed
// into Wc = ceil(C / 64) 64-bit words, channel c at bit c % 64 of word c / 64; the unused high
// bits of the last word are 0 in both the activations and the weights, so they cancel in the xor.
// Zero padding is materialised as all-zero pixels (= -1 everywhere); the Python side adds the exact
// correction (a per-output-position "border term", see layers.py).
#pragma once

#include <cstdint>

namespace abc_packed {

// kAvx512Emulated: the AVX-512 code with its AVX-512 intrinsics emulated on AVX2 (tests only).
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Emulated = 3 };
// The paths' names, indexed by code: the one list of them (Python reads it through the operator
// isa_names() to build abc_experiments.packed._ext.ISA_CODES).
inline constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_emulated"};
inline constexpr int64_t kIsaCount = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// Which ISAs this CPU (and OS) can run: bit 0 AVX2, bit 1 AVX-512 F/BW/DQ/VL + VPOPCNTDQ.
int cpu_features();

// (B, C, H, W) float input -> packed bits (B, Hp, Wp, N, Wc), `out` zero-filled by the caller.
// The input is dense in NCHW order or, with `channels_last`, in NHWC order (torch.channels_last:
// a pixel's C channels side by side, so a byte of the packed word is one compare of 8 neighbours).
struct PackArgs {
  const float* x;
  int64_t B, C, H, W;
  const float* shifts;  // (N,): bit n of a value x is (x + shifts[n] >= 0.5f), as the float layer computes it
  int64_t N, ph, pw, Hp, Wp, Wc;
  uint64_t* out;
  bool channels_last = false;
};

// Row-major (R, F) float input -> packed bits (R, N, Wc), `out` zero-filled by the caller.
struct RowPackArgs {
  const float* x;
  int64_t R, F;
  const float* shifts;
  int64_t N, Wc;
  uint64_t* out;
};

// Binary convolution of packed activations with packed weights; writes
//   out[b, co, oy, ox] = bterm[co, oy, ox] + sum_{m,n} coef[m, n, co] * (popcount(xor) - K/2)
// at the offsets given by out's and bterm's strides (any; the AVX stores have fast paths for
// NCHW outputs with bterm (C, OH, OW) and for channels-last outputs with bterm (OH, OW, C) in
// memory, where a tile's 8 channels go out as one contiguous vector)
// (then + residual[b, co, oy, ox] if given, then max(., 0) with `relu`; a following BatchNorm is
// folded into coef and bterm by the caller)
// (centred counts: both terms stay of the output's magnitude, no cancellation of large numbers)
// (a linear layer is the 1x1 case on a 1 x R "image", with its own output/bterm strides).
struct ConvArgs {
  const uint64_t* xp;  // (B, Hp, Wp, N, Wc)
  int64_t B, Hp, Wp, N, Wc;
  const uint64_t* wk;  // (M, COB, kh, kw, Wc, 8): the same word of 8 output channels side by side
  int64_t M, COB, Cout, kh, kw, sh, sw, dh, dw, OH, OW;
  const float* coef;  // (M, N, COB * 8): -2 alpha_m[co] beta_n, 0 for padded channels
  const float* bterm;
  int64_t e_co, e_y, e_x;  // strides of bterm
  float* out;
  int64_t o_b, o_co, o_y, o_x;  // strides of out
  float half_k;                 // K / 2, K = bits per receptive field (C_in * kh * kw)
  bool relu;                    // out = max(out, 0): a following ReLU fused into the store
  const float* residual;        // nullptr, or added before the ReLU (conv layers: out's shape and strides)
  // Set by the kernels (conv_impl), not the caller: the offset from a position's first activation
  // word of each of a kernel row's kw * Wc words, in (kx, word) order, so the loop over a kernel
  // row is one flat loop (at 64 channels, 3 x 3, a nest of 3 x 1 iterations cost as much as its body).
  const int64_t* taps = nullptr;
};

// Dense taps, for inputs of fewer than 64 channels (or any C where it saves words): packed pixels
// (rows, Wp, N, Wc) -> (rows, Wq, N, Wr), Wq = Wp - dw (kw - 1), where position x holds the kw
// pixels x, x + dw, ... of its kernel row side by side: bit kx * C + c of the Wr = ceil(kw C / 64)
// words is channel c of pixel x + kx dw. A k x k conv then runs as a k x 1 conv on Wr words per
// position instead of kw Wc (16 channels, 3 x 3: one word per kernel row instead of three).
// `out` zero-filled by the caller.
struct TapArgs {
  const uint64_t* in;
  int64_t rows, Wp, N, Wc, C, kw, dw, Wq, Wr;
  uint64_t* out;
};

// The operand layout of the packed format, which a kernel policy uses as it is (see
// cpu/kernel_body.h: layout()).
struct PackedLayout {
  struct Operands {};
  static inline ConvArgs layout(const ConvArgs& a, Operands&) { return a; }
};

// How the kernels split their work over torch's threads (at::parallel_for grains: the fewest items
// one task takes), in one place.
constexpr int64_t kTapRowsGrain = 16;        // concat_taps: padded pixel rows per task
constexpr int64_t kPackRowsGrain = 1;        // pack_nchw: image rows (B * H) per task
constexpr int64_t kRowPackWideGrain = 1;     // pack_rows: rows per task when a row has >= kRowPackWide bits
constexpr int64_t kRowPackNarrowGrain = 64;  // ... and when it has fewer
constexpr int64_t kRowPackWide = 4096;       // (F * N bits per row)
constexpr int64_t kConvTasksPerThread = 4;   // conv: with fewer output rows than this many per thread,
                                             // the output channels are split into groups too
constexpr int64_t kSplitGrain = 4096;        // AVX2 nibble split: activation words per task

void pack_nchw(Isa isa, const PackArgs& args);
void concat_taps(const TapArgs& args);
void pack_rows(Isa isa, const RowPackArgs& args);
void conv(Isa isa, const ConvArgs& args);

}  // namespace abc_packed
