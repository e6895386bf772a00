// One-pass CPU kernels of the ABC activation staircase Σₙ βₙ H(x + vₙ) and its STE gradients
// (abc_experiments/nn/activations.py: `staircase` / `staircase_grad` are the reference).
//
// Values are bit-identical to the reference: y = x + vₙ is rounded in x's dtype (bfloat16: the add in
// float, rounded to nearest even, as torch does), and the output sums the terms in the order
// n = 0..N-1 with every partial sum rounded to x's dtype. Build without -ffast-math and with
// -ffp-contract=off (an FMA would change the bits of grad_x = grad_x + β·g).
//
// The flat input is cut into fixed blocks of BLOCK elements; at::parallel_for hands out ranges of
// blocks; each block sweeps its (cache-resident) elements once per n. The shift and beta gradients
// are summed in double, per block in LANES independent accumulators, and the per-block partials are
// reduced in block order at the end: the results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace abc_nn {
namespace {

constexpr int64_t BLOCK = 4096;      // elements per block (16 KiB of float scratch)
constexpr int64_t GRAIN = 8;         // blocks per parallel task at least (32K elements)
constexpr int LANES = 16;            // independent double accumulators (vectorisable reductions)

#define ABC_INLINE inline __attribute__((always_inline))

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// float -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rounding).
inline uint16_t bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(rounded);
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Rounding of an intermediate result to the tensor's dtype (identity for float32).
template <bool BF16>
inline float rnd(float f) {
  if constexpr (BF16) {
    return bf16_to_float(bf16_bits(f));
  } else {
    return f;
  }
}

// Load / store of a block as float.
template <bool BF16>
inline void load_block(const void* src, int64_t start, int64_t len, float* __restrict dst) {
  if constexpr (BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + start;
    for (int64_t i = 0; i < len; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(src) + start, len * sizeof(float));
  }
}

template <bool BF16>
inline void store_block(const float* __restrict src, int64_t len, void* dst, int64_t start) {
  if constexpr (BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + start;
    for (int64_t i = 0; i < len; ++i) d[i] = bf16_bits(src[i]);  // exact: src holds bf16 values
  } else {
    std::memcpy(static_cast<float*>(dst) + start, src, len * sizeof(float));
  }
}

constexpr uint32_t SIGN = 0x80000000u;

// +b where `up`, else -b (flipping the sign bit: exactly -b), without a branch.
inline float plus_minus(float b, bool up) { return bits_to_float(float_to_bits(b) ^ (up ? 0u : SIGN)); }

// g where `keep`, else +0 (torch.where(mask, g, 0.0): an infinite g outside the window gives 0).
inline float keep_or_zero(float g, bool keep) { return bits_to_float(float_to_bits(g) & (keep ? ~0u : 0u)); }

template <bool BF16>
ABC_INLINE void forward_block(const float* __restrict x, float* __restrict out, int64_t len, const float* v,
                              const float* b, int64_t N) {
  {
    const float v0 = v[0], b0 = b[0];
    for (int64_t i = 0; i < len; ++i) out[i] = plus_minus(b0, rnd<BF16>(x[i] + v0) >= 0.5f);
  }
  for (int64_t n = 1; n < N; ++n) {
    const float vn = v[n], bn = b[n];
    for (int64_t i = 0; i < len; ++i) out[i] = rnd<BF16>(out[i] + plus_minus(bn, rnd<BF16>(x[i] + vn) >= 0.5f));
  }
}

// grad_x for the block into gx (float values of the dtype); Σ g over the window and Σ ±g per n
// into sums[2n], sums[2n + 1].
template <bool BF16>
ABC_INLINE void backward_block(const float* __restrict x, const float* __restrict g, float* __restrict gx,
                               int64_t len, const float* v, const float* b, int64_t N, double* sums) {
  for (int64_t i = 0; i < len; ++i) gx[i] = 0.0f;
  const int64_t body = len - len % LANES;
  for (int64_t n = 0; n < N; ++n) {
    const float vn = v[n], bn = b[n];
    double window[LANES] = {0}, signed_sum[LANES] = {0};
    for (int64_t i = 0; i < body; i += LANES) {
      for (int j = 0; j < LANES; ++j) {
        const float y = rnd<BF16>(x[i + j] + vn);
        const float gi = g[i + j];
        const float passed = keep_or_zero(gi, (y >= 0.0f) & (y <= 1.0f));
        gx[i + j] = rnd<BF16>(gx[i + j] + rnd<BF16>(bn * passed));
        window[j] += double(passed);
        signed_sum[j] += double(plus_minus(gi, y >= 0.5f));
      }
    }
    for (int64_t i = body; i < len; ++i) {
      const float y = rnd<BF16>(x[i] + vn);
      const float gi = g[i];
      const float passed = keep_or_zero(gi, (y >= 0.0f) & (y <= 1.0f));
      gx[i] = rnd<BF16>(gx[i] + rnd<BF16>(bn * passed));
      window[i - body] += double(passed);
      signed_sum[i - body] += double(plus_minus(gi, y >= 0.5f));
    }
    double w = 0.0, s = 0.0;
    for (int j = 0; j < LANES; ++j) {
      w += window[j];
      s += signed_sum[j];
    }
    sums[2 * n] = w;
    sums[2 * n + 1] = s;
  }
}

// One compiled copy per instruction set, picked at load time by the CPU (GCC function multiversioning
// on x86-64; elsewhere one copy for the compiler's default target).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ABC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ABC_CLONES
#endif

ABC_CLONES void forward_f32(const float* x, float* out, int64_t len, const float* v, const float* b, int64_t N) {
  forward_block<false>(x, out, len, v, b, N);
}
ABC_CLONES void forward_bf16(const float* x, float* out, int64_t len, const float* v, const float* b, int64_t N) {
  forward_block<true>(x, out, len, v, b, N);
}
ABC_CLONES void backward_f32(const float* x, const float* g, float* gx, int64_t len, const float* v, const float* b,
                             int64_t N, double* sums) {
  backward_block<false>(x, g, gx, len, v, b, N, sums);
}
ABC_CLONES void backward_bf16(const float* x, const float* g, float* gx, int64_t len, const float* v, const float* b,
                              int64_t N, double* sums) {
  backward_block<true>(x, g, gx, len, v, b, N, sums);
}

bool is_bf16(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16; }

void check_inputs(const at::Tensor& x, const at::Tensor& shifts, const at::Tensor& betas) {
  TORCH_CHECK(x.device().is_cpu(), "abc_nn: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "abc_nn: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(shifts.dim() == 1 && betas.dim() == 1 && shifts.numel() == betas.numel() && shifts.numel() >= 1,
              "abc_nn: shifts and betas must be vectors of the same length N >= 1, got ", shifts.sizes(), " and ",
              betas.sizes());
}

// The shifts and betas as float values of x's dtype.
std::vector<float> as_floats(const at::Tensor& t, const at::Tensor& x) {
  at::Tensor c = t.detach().to(at::kCPU).to(x.scalar_type()).to(at::kFloat).contiguous();
  const float* p = c.data_ptr<float>();
  return std::vector<float>(p, p + c.numel());
}

at::Tensor staircase_forward(const at::Tensor& x_in, const at::Tensor& shifts, const at::Tensor& betas) {
  check_inputs(x_in, shifts, betas);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const std::vector<float> v = as_floats(shifts, x), b = as_floats(betas, x);
  const int64_t numel = x.numel(), N = shifts.numel();
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
  const bool bf16 = is_bf16(x);
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, blocks, GRAIN, [&](int64_t first, int64_t last) {
    std::vector<float> xs(BLOCK), os(BLOCK);
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * BLOCK, len = std::min(BLOCK, numel - start);
      if (bf16) {
        load_block<true>(xp, start, len, xs.data());
        forward_bf16(xs.data(), os.data(), len, v.data(), b.data(), N);
        store_block<true>(os.data(), len, op, start);
      } else {
        forward_f32(static_cast<const float*>(xp) + start, static_cast<float*>(op) + start, len,
                             v.data(), b.data(), N);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> staircase_backward(const at::Tensor& x_in, const at::Tensor& grad_in,
                                                                  const at::Tensor& shifts, const at::Tensor& betas) {
  check_inputs(x_in, shifts, betas);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "abc_nn: grad has shape ", grad_in.sizes(), ", x has ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  const std::vector<float> v = as_floats(shifts, x), b = as_floats(betas, x);
  const int64_t numel = x.numel(), N = shifts.numel();
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
  std::vector<double> partial(blocks * 2 * N, 0.0);
  const bool bf16 = is_bf16(x);
  const void* xp = x.data_ptr();
  const void* gp = grad.data_ptr();
  void* gxp = grad_x.data_ptr();
  at::parallel_for(0, blocks, GRAIN, [&](int64_t first, int64_t last) {
    std::vector<float> xs(BLOCK), gs(BLOCK), gxs(BLOCK);
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * BLOCK, len = std::min(BLOCK, numel - start);
      double* sums = partial.data() + block * 2 * N;
      if (bf16) {
        load_block<true>(xp, start, len, xs.data());
        load_block<true>(gp, start, len, gs.data());
        backward_bf16(xs.data(), gs.data(), gxs.data(), len, v.data(), b.data(), N, sums);
        store_block<true>(gxs.data(), len, gxp, start);
      } else {
        backward_f32(static_cast<const float*>(xp) + start, static_cast<const float*>(gp) + start,
                              static_cast<float*>(gxp) + start, len, v.data(), b.data(), N, sums);
      }
    }
  });
  std::vector<double> window(N, 0.0), signed_sum(N, 0.0);
  for (int64_t block = 0; block < blocks; ++block) {  // in block order: independent of the threads
    for (int64_t n = 0; n < N; ++n) {
      window[n] += partial[block * 2 * N + 2 * n];
      signed_sum[n] += partial[block * 2 * N + 2 * n + 1];
    }
  }
  at::Tensor grad_shifts = at::empty({N}, at::kDouble), grad_betas = at::empty({N}, at::kDouble);
  double* gs = grad_shifts.data_ptr<double>();
  double* gb = grad_betas.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) {
    gs[n] = double(b[n]) * window[n];
    gb[n] = signed_sum[n];
  }
  return {grad_x, grad_shifts.to(shifts.scalar_type()), grad_betas.to(betas.scalar_type())};
}

}  // namespace

// How many threads at::parallel_for used for `tasks` one-element tasks: what a test reads to check
// that the build really runs in parallel (without -fopenmp, parallel_for is silently serial).
int64_t parallel_threads(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << (at::get_thread_num() & 63)); });
  return __builtin_popcountll(seen.load());
}

TORCH_LIBRARY(abc_nn, m) {
  m.def("staircase_forward(Tensor x, Tensor shifts, Tensor betas) -> Tensor");
  m.def("staircase_backward(Tensor x, Tensor grad, Tensor shifts, Tensor betas) -> (Tensor, Tensor, Tensor)");
  m.def("parallel_threads(int tasks) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(abc_nn, CPU, m) {
  m.impl("staircase_forward", &staircase_forward);
  m.impl("staircase_backward", &staircase_backward);
}

}  // namespace abc_nn
