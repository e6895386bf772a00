// Operator registration (TORCH_LIBRARY "abc_packed") and argument checks for the packed ABC
// kernels. Tensors come in and go out without copies: inputs must already be dense float32, in
// NCHW order or (4-d inputs of the conv operators) torch.channels_last, whose output then is
// channels_last too, as F.conv2d's (the Python wrappers in abc_experiments/packed/ops.py check
// them and say what is wrong).
// Every operator entry checks all of its preconditions (TORCH_CHECK: a RuntimeError in Python)
// before any kernel reads memory: devices, dtypes, ranks, the input's channel count against the
// packed weights (K = C_in kh kw = 2 half_k), sizes against the kernel; an empty batch returns an
// empty output without calling a kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <iterator>
#include <string>
#include <vector>

#include "packed_ops.h"

namespace abc_packed {
namespace {

Isa checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa < kIsaCount, "abc_packed: unknown isa code ", isa, " (isa_names() lists ",
              kIsaCount, " paths by code)");
  static const int features = cpu_features();  // the CPU does not change: ask it once, not per call
  TORCH_CHECK(isa != 2 || (features & 2), "abc_packed: this CPU lacks AVX-512 F/BW/DQ/VL + VPOPCNTDQ");
  TORCH_CHECK((isa != 1 && isa != 3) || (features & 1), "abc_packed: this CPU lacks AVX2 + FMA");
  return static_cast<Isa>(isa);
}

// A 4-d tensor dense in channels-last order that torch takes for channels_last (a tensor dense in
// both orders, with C == 1 or H == W == 1, by its strides, as F.conv2d decides its output's format;
// its memory is the same in both orders).
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// `channels_last`: a 4-d input may also be dense in channels-last order.
void check_float_input(const at::Tensor& x, int64_t dim, const char* what, bool channels_last = false) {
  TORCH_CHECK(x.device().is_cpu(), "abc_packed: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "abc_packed: ", what, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, "abc_packed: ", what, " must have ", dim, " dimensions, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || (channels_last && is_channels_last(x)), "abc_packed: ", what,
              " must be contiguous", channels_last ? " (NCHW or channels_last)" : "");
}

// The same sizes, and the same strides wherever a size exceeds 1: the same element at each offset.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

void check_shifts(const at::Tensor& shifts) {
  TORCH_CHECK(shifts.device().is_cpu() && shifts.scalar_type() == at::kFloat && shifts.dim() == 1 &&
                  shifts.is_contiguous() && shifts.numel() >= 1,
              "abc_packed: shifts must be a contiguous float32 CPU vector with N >= 1 entries");
}

at::Tensor pack_nchw_op(const at::Tensor& x, const at::Tensor& shifts, int64_t pad_h, int64_t pad_w, int64_t isa) {
  check_float_input(x, 4, "input", /*channels_last=*/true);
  check_shifts(shifts);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "abc_packed: negative padding");
  const Isa code = checked_isa(isa);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = shifts.numel();
  const int64_t Wc = (C + 63) / 64, Hp = H + 2 * pad_h, Wp = W + 2 * pad_w;
  at::Tensor out = at::zeros({B, Hp, Wp, N, Wc}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return out;  // nothing to binarize (an empty batch or image): padding stays 0
  PackArgs args{x.data_ptr<float>(), B, C, H, W, shifts.data_ptr<float>(), N, pad_h, pad_w, Hp, Wp, Wc,
                reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()), is_channels_last(x)};
  pack_nchw(code, args);
  return out;
}

at::Tensor pack_rows_op(const at::Tensor& x, const at::Tensor& shifts, int64_t isa) {
  check_float_input(x, 2, "input");
  check_shifts(shifts);
  const Isa code = checked_isa(isa);
  const int64_t R = x.size(0), F = x.size(1), N = shifts.numel(), Wc = (F + 63) / 64;
  at::Tensor out = at::zeros({R, N, Wc}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return out;
  RowPackArgs args{x.data_ptr<float>(), R, F, shifts.data_ptr<float>(), N, Wc,
                   reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>())};
  pack_rows(code, args);
  return out;
}

// The input's channel count against the layer's: K = C_in kh kw bits per receptive field, which the
// caller passes as half_k = K / 2 (the word counts alone would accept every C_in that rounds to the
// same number of 64-bit words).
void check_channels(const at::Tensor& x, int64_t kh, int64_t kw, double half_k, const char* what) {
  TORCH_CHECK(std::isfinite(half_k) && half_k > 0, "abc_packed: ", what, ": half_k = ", half_k,
              " must be K / 2 > 0 (K = C_in * kh * kw)");
  const double K = 2 * half_k, per_channel = static_cast<double>(kh * kw);
  TORCH_CHECK(static_cast<double>(x.size(1)) * per_channel == K, "abc_packed: ", what, ": the input has ",
              x.size(1), " channels (shape ", x.sizes(), ") but the packed weights expect ", K / per_channel,
              " (K = ", K, " bits for a ", kh, "x", kw, " kernel)");
}

void check_weights(const at::Tensor& wk, const at::Tensor& coef, int64_t N, int64_t Wc, int64_t kh, int64_t kw,
                   int64_t Cout) {
  TORCH_CHECK(wk.device().is_cpu() && wk.scalar_type() == at::kLong && wk.dim() == 6 && wk.is_contiguous(),
              "abc_packed: packed weights must be a contiguous int64 CPU tensor (M, COB, kh, kw, Wc, 8)");
  const int64_t M = wk.size(0), COB = wk.size(1);
  TORCH_CHECK(wk.size(2) == kh && wk.size(3) == kw && wk.size(4) == Wc && wk.size(5) == 8,
              "abc_packed: packed weights of shape ", wk.sizes(), " do not match kernel ", kh, "x", kw,
              " and ", Wc, " words per pixel");
  TORCH_CHECK(COB * 8 >= Cout && (COB - 1) * 8 < Cout, "abc_packed: packed weights hold ", COB * 8,
              " output channels for ", Cout);
  TORCH_CHECK(coef.device().is_cpu() && coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
                  coef.dim() == 3 && coef.size(0) == M && coef.size(1) == N && coef.size(2) == COB * 8,
              "abc_packed: coef must be a contiguous float32 tensor (M, N, COB*8) = (", M, ", ", N, ", ", COB * 8,
              "), got ", coef.sizes());
}

at::Tensor conv2d_op(const at::Tensor& x, const at::Tensor& wk, const at::Tensor& coef, const at::Tensor& bterm,
                     const at::Tensor& shifts, int64_t out_channels, at::IntArrayRef kernel, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, double half_k,
                     int64_t isa, bool relu, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "abc_packed: kernel, stride, padding and dilation need 2 values each");
  const Isa code = checked_isa(isa);
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 &&
                  dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "abc_packed: conv2d: kernel, stride and dilation must be >= 1 and padding >= 0, got kernel ", kernel,
              ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  TORCH_CHECK(out_channels >= 1, "abc_packed: conv2d: out_channels = ", out_channels, " must be >= 1");
  check_float_input(x, 4, "conv2d input", /*channels_last=*/true);
  check_shifts(shifts);
  check_channels(x, kernel[0], kernel[1], half_k, "conv2d");
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= dilation[0] * (kernel[0] - 1) + 1 &&
                  x.size(3) + 2 * padding[1] >= dilation[1] * (kernel[1] - 1) + 1,
              "abc_packed: conv2d: input ", x.sizes(), " padded by ", padding, " is smaller than the ", kernel,
              " kernel dilated by ", dilation);
  at::Tensor xp = pack_nchw_op(x, shifts, padding[0], padding[1], isa);
  const int64_t B = x.size(0), C = x.size(1), N = shifts.numel(), Hp = xp.size(1);
  int64_t Wc = xp.size(4), Wp = xp.size(2), kw = kernel[1], dw = dilation[1];
  const int64_t kh = kernel[0];
  TORCH_CHECK(Hp >= dilation[0] * (kh - 1) + 1 && Wp >= dw * (kw - 1) + 1,
              "abc_packed: input ", x.sizes(), " is smaller than the (dilated) kernel");
  const int64_t OH = (Hp - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t OW = (Wp - dw * (kw - 1) - 1) / stride[1] + 1;
  if (kw > 1 && wk.dim() == 6 && wk.size(3) == 1) {  // weights packed with dense taps (see TapArgs)
    const int64_t Wq = Wp - dw * (kw - 1), Wr = (kw * C + 63) / 64;
    at::Tensor xq = at::zeros({B, Hp, Wq, N, Wr}, xp.options());
    concat_taps(TapArgs{reinterpret_cast<const uint64_t*>(xp.data_ptr<int64_t>()), B * Hp, Wp, N, Wc, C, kw, dw,
                        Wq, Wr, reinterpret_cast<uint64_t*>(xq.data_ptr<int64_t>())});
    xp = xq;
    Wp = Wq, Wc = Wr, kw = 1, dw = 1;
  }
  check_weights(wk, coef, N, Wc, kh, kw, out_channels);
  // bterm (C_out, OH, OW): dense, either in that order or as (OH, OW, C_out) in memory (what a
  // channels-last output reads 8 channels at a time from; the kernel follows the strides)
  TORCH_CHECK(bterm.device().is_cpu() && bterm.scalar_type() == at::kFloat && bterm.dim() == 3 &&
                  bterm.size(0) == out_channels && bterm.size(1) == OH && bterm.size(2) == OW &&
                  (bterm.is_contiguous() || bterm.permute({1, 2, 0}).is_contiguous()),
              "abc_packed: border term must be a dense float32 tensor (", out_channels, ", ", OH, ", ", OW,
              "), contiguous or permuted from (OH, OW, C_out), got ", bterm.sizes(), " with strides ", bterm.strides());
  const bool channels_last = is_channels_last(x);  // the output follows the input, as F.conv2d's
  at::Tensor out = at::empty({B, out_channels, OH, OW},
                             x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous));
  const float* res = nullptr;
  at::Tensor res_copy;  // the residual in the output's memory layout where it came in another one
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat && r.sizes() == out.sizes(),
                "abc_packed: the residual must be a float32 CPU tensor of the output's shape ", out.sizes(),
                ", got ", r.scalar_type(), " ", r.sizes(), " on ", r.device());
    if (same_layout(r, out)) {
      res = r.data_ptr<float>();
    } else {
      res_copy = at::empty_like(out);
      res_copy.copy_(r);
      res = res_copy.data_ptr<float>();
    }
  }
  if (B == 0) return out;  // an empty batch: an empty output, no kernel call
  ConvArgs args{reinterpret_cast<const uint64_t*>(xp.data_ptr<int64_t>()), B, Hp, Wp, N, Wc,
                reinterpret_cast<const uint64_t*>(wk.data_ptr<int64_t>()), wk.size(0), wk.size(1), out_channels,
                kh, kw, stride[0], stride[1], dilation[0], dw, OH, OW, coef.data_ptr<float>(),
                bterm.data_ptr<float>(), bterm.stride(0), bterm.stride(1), bterm.stride(2), out.data_ptr<float>(),
                out.stride(0), out.stride(1), out.stride(2), out.stride(3), static_cast<float>(half_k), relu, res};
  conv(code, args);
  return out;
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& wk, const at::Tensor& coef, const at::Tensor& bterm,
                     const at::Tensor& shifts, int64_t out_features, double half_k, int64_t isa) {
  const Isa code = checked_isa(isa);
  TORCH_CHECK(out_features >= 1, "abc_packed: linear: out_features = ", out_features, " must be >= 1");
  check_float_input(x, 2, "linear input");
  check_shifts(shifts);
  check_channels(x, 1, 1, half_k, "linear");
  at::Tensor xp = pack_rows_op(x, shifts, isa);
  const int64_t R = x.size(0), N = shifts.numel(), Wc = xp.size(2);
  check_weights(wk, coef, N, Wc, 1, 1, out_features);
  TORCH_CHECK(bterm.device().is_cpu() && bterm.scalar_type() == at::kFloat && bterm.is_contiguous() &&
                  bterm.dim() == 1 && bterm.size(0) == out_features,
              "abc_packed: bias term must be a contiguous float32 vector of ", out_features, " entries");
  at::Tensor out = at::empty({R, out_features}, x.options());
  if (R == 0) return out;  // no rows: an empty output, no kernel call
  // the rows are the positions of a 1 x R image; the output is (R, out_features), channels contiguous
  ConvArgs args{reinterpret_cast<const uint64_t*>(xp.data_ptr<int64_t>()), 1, 1, R, N, Wc,
                reinterpret_cast<const uint64_t*>(wk.data_ptr<int64_t>()), wk.size(0), wk.size(1), out_features,
                1, 1, 1, 1, 1, 1, 1, R, coef.data_ptr<float>(), bterm.data_ptr<float>(), 1, 0, 0,
                out.data_ptr<float>(), 0, 1, 0, out_features, static_cast<float>(half_k), false, nullptr};
  conv(code, args);
  return out;
}

// A chain of packed convs in ONE call (what packed.chain_packed_convs builds from a fused model's
// graph): at batch 1 the Python and dispatcher work around each layer's call costs as much as a
// small layer's kernel. Values are numbered: 0 .. inputs-1 the inputs, then one per step, its
// output. `program`: [steps, outputs, the output values..., then per step kStepInts ints:
// out_channels, kh, kw, sh, sw, ph, pw, dh, dw, relu, input value, residual value (-1: none),
// in_channels].
// `tensors`: per step its wk, coef, bterm, shifts (bterm best permuted from (OH, OW, C_out), the
// layout of a channels-last output). Returns the output values, in order, contiguous (NCHW). Each step
// is exactly the conv2d operator (same kernel, same arguments), and a value is freed after its
// last use.
constexpr int64_t kStepInts = 13;

std::vector<at::Tensor> conv2d_chain_op(at::TensorList inputs, at::TensorList tensors, at::IntArrayRef program,
                                        int64_t isa) {
  const int64_t n_in = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(n_in >= 1, "abc_packed: conv2d_chain: no inputs");
  TORCH_CHECK(program.size() >= 2, "abc_packed: conv2d_chain: empty program");
  checked_isa(isa);
  const int64_t steps = program[0], n_out = program[1], head = 2 + n_out;
  TORCH_CHECK(steps >= 1 && n_out >= 1 && static_cast<int64_t>(program.size()) == head + steps * kStepInts &&
                  static_cast<int64_t>(tensors.size()) == 4 * steps,
              "abc_packed: conv2d_chain: a program of ", program.size(), " ints and ", tensors.size(),
              " tensors does not describe ", steps, " steps and ", n_out, " outputs");
  const int64_t values = n_in + steps;
  std::vector<int64_t> last_use(values, -1);
  for (int64_t i = 0; i < n_out; ++i) {
    TORCH_CHECK(program[2 + i] >= 0 && program[2 + i] < values, "abc_packed: conv2d_chain: bad output value");
    last_use[program[2 + i]] = steps;  // kept to the end
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t* p = program.data() + head + s * kStepInts;
    TORCH_CHECK(p[10] >= 0, "abc_packed: conv2d_chain: step ", s, " has no input value");
    TORCH_CHECK(p[12] >= 1 && p[1] >= 1 && p[2] >= 1, "abc_packed: conv2d_chain: step ", s,
                " has in_channels ", p[12], " and a ", p[1], "x", p[2], " kernel");
    for (int64_t v : {p[10], p[11]}) {
      TORCH_CHECK(v >= -1 && v < n_in + s, "abc_packed: conv2d_chain: step ", s, " reads value ", v,
                  ", which is not computed before it");
      if (v >= 0 && last_use[v] < s) last_use[v] = s;
    }
  }
  std::vector<at::Tensor> value(values);
  // every step runs channels-last (the inputs converted once here, each output channels-last as its
  // input): a tile's 8 output channels are 8 neighbouring floats, stored and binarized without a
  // transpose; the values (outputs included) are the NCHW path's, bit for bit
  for (int64_t i = 0; i < n_in; ++i)
    value[i] = inputs[i].dim() == 4 ? inputs[i].contiguous(at::MemoryFormat::ChannelsLast) : inputs[i];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t* p = program.data() + head + s * kStepInts;
    const at::Tensor& x = value[p[10]];
    TORCH_CHECK(x.defined() && x.dim() == 4, "abc_packed: conv2d_chain: step ", s, " needs a 4-dimensional input");
    TORCH_CHECK(x.size(1) == p[12], "abc_packed: conv2d_chain: step ", s, " expects ", p[12],
                " input channels, got shape ", x.sizes());
    c10::optional<at::Tensor> residual;
    if (p[11] >= 0) residual = value[p[11]];
    const double half_k = static_cast<double>(p[12] * p[1] * p[2]) / 2;
    value[n_in + s] = conv2d_op(x, tensors[4 * s], tensors[4 * s + 1], tensors[4 * s + 2], tensors[4 * s + 3],
                                p[0], {p[1], p[2]}, {p[3], p[4]}, {p[5], p[6]}, {p[7], p[8]}, half_k, isa,
                                p[9] != 0, residual);
    for (int64_t v : {p[10], p[11]})
      if (v >= 0 && last_use[v] == s) value[v].reset();  // no longer needed: free it now
  }
  std::vector<at::Tensor> out;
  out.reserve(n_out);
  // NCHW again for what follows (a channels_last tensor would change the summation order of, say,
  // the average pooling after a ResNet's body: the model's output would not be the same bits)
  for (int64_t i = 0; i < n_out; ++i) out.push_back(value[program[2 + i]].contiguous());
  return out;
}

int64_t cpu_features_op() { return cpu_features(); }

std::vector<std::string> isa_names_op() { return {std::begin(kIsaNames), std::end(kIsaNames)}; }

// How many threads at::parallel_for used for `tasks` one-element tasks: what a test reads to check
// that the build really runs in parallel (without -fopenmp, parallel_for is silently serial).
int64_t parallel_threads(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << (at::get_thread_num() & 63)); });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY(abc_packed, m) {
  m.def("cpu_features() -> int", &cpu_features_op);
  m.def("isa_names() -> str[]", &isa_names_op);
  m.def("parallel_threads(int tasks) -> int", &parallel_threads);
  m.def("pack_nchw(Tensor x, Tensor shifts, int pad_h, int pad_w, int isa) -> Tensor", &pack_nchw_op);
  m.def("pack_rows(Tensor x, Tensor shifts, int isa) -> Tensor", &pack_rows_op);
  m.def("conv2d(Tensor x, Tensor wk, Tensor coef, Tensor bterm, Tensor shifts, int out_channels, int[] kernel, "
        "int[] stride, int[] padding, int[] dilation, float half_k, int isa, bool relu=False, "
        "Tensor? residual=None) -> Tensor",
        &conv2d_op);
  m.def("conv2d_chain(Tensor[] inputs, Tensor[] tensors, int[] program, int isa) -> Tensor[]", &conv2d_chain_op);
  m.def("linear(Tensor x, Tensor wk, Tensor coef, Tensor bterm, Tensor shifts, int out_features, float half_k, int isa) -> Tensor",
        &linear_op);
}

}  // namespace abc_packed
