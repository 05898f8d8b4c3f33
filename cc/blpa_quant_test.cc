// keras_blpa: standalone test and benchmark of the cc/ kernels (no TensorFlow).
//
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-trapping-math -mavx -pthread
//       -I. cc/blpa_quant_test.cc -o blpa_quant_test && ./blpa_quant_test
// With a CUDA toolkit (GPU checks and timings run when a device is present):
//   nvcc -c -O3 -std=c++17 -fmad=false -I. cc/blpa_quant_cuda.cu -o cuda.o
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-trapping-math -mavx -pthread
//       -DBLPA_WITH_CUDA -I. -I$CUDA/include cc/blpa_quant_test.cc cuda.o
//       -L$CUDA/lib64 -l:libcudart_static.a -ldl -lrt -o blpa_quant_test
// (-ffp-contract=off keeps x * scale + offset two roundings, like TensorFlow;
// -fno-trapping-math only lets the compiler vectorise the selects.)
//
// Checks the tiled, multi-threaded CPU loops against a plain per-element loop
// (codes, activations, decoded values and input gradients bit for bit; the
// reduce's sums to float tolerance, and bit for bit across ISA levels and
// thread counts) over many shapes, every bits value and NaN/Inf inputs; with
// BLPA_WITH_CUDA also the GPU kernels against the CPU ones. Checks run for
// every activation of blpa_activations.h (kActivations: each name of the ops'
// `activation` attr, leaky_relu with two slopes), all bit for bit on the CPU;
// on the GPU the smooth ones but hard_silu compare to a few ulp (CUDA's
// expf / erfcf / tanhf / powf are not the host libm's). Then prints encode+decode
// throughput in GB/s (bytes read + written) next to a memcpy of the input.
// Options: --quick (smaller benchmark), --no-bench, --threads N, --elements N,
// --isa avx|avx2|avx512 (cap the instruction-set level: checks run every level
// up to the cap, the benchmark runs at the cap; default: the best the CPU has).
// Exit status 0 when every check passes, 1 on a mismatch.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cc/blpa_activations.h"
#include "cc/blpa_bins.h"
#include "cc/blpa_cpu.h"
#if defined(BLPA_WITH_CUDA)
#include <cuda_runtime.h>

#include "cc/blpa_quant_cuda.h"
#endif

namespace {

int g_failures = 0;

void fail(const std::string& what) {
  ++g_failures;
  if (g_failures <= 20) fprintf(stderr, "MISMATCH: %s\n", what.c_str());
}

// Runs fn(begin, end) over [0, total) split into `threads` contiguous parts.
template <typename Fn>
void parallel_for(int threads, int64_t total, Fn fn) {
  if (threads <= 1 || total < 2) {
    fn(int64_t{0}, total);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (total + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(total, b + chunk);
    if (b >= e) break;
    pool.emplace_back([=] { fn(b, e); });
  }
  for (auto& th : pool) th.join();
}

struct Problem {
  int64_t n, C;
  int bits;
  std::vector<float> x, scale, offset, inv_step, step, shift, gamma, beta, grad,
      coef, mean_g, mean_gx;
};

Problem make_problem(int64_t n, int64_t C, int bits, uint32_t seed) {
  Problem p;
  p.n = n;
  p.C = C;
  p.bits = bits;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.2f, 2.0f);
  const float levels = static_cast<float>(1 << bits);
  p.x.resize(n);
  p.grad.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    p.x[i] = 2.0f * normal(rng);
    p.grad[i] = normal(rng);
  }
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 0.0f,
                            -0.0f, 1e30f, -1e30f, 1e-40f};
  for (int64_t i = 0; i < n; i += 97) p.x[i] = specials[(i / 97) % 8];
  for (int64_t c = 0; c < C; ++c) {
    float g = uni(rng) * ((c % 5 == 3) ? -1.0f : 1.0f);  // some negative gamma
    const float ag = std::fabs(g);
    // Some saturated windows (shift < 1 or > 2^K - 1): |beta| = 10 |gamma|,
    // and |beta| so large that shift reaches the reference's bound 2^24.
    const int kind = static_cast<int>(c % 7);
    const float b = kind == 2   ? 10.0f * ag
                    : kind == 4 ? -10.0f * ag
                    : kind == 6 ? (c % 2 ? 1e9f : -1e9f) * ag
                                : normal(rng);
    const float mean = 0.3f * normal(rng), inv_std = uni(rng);
    p.gamma.push_back(g);
    p.beta.push_back(b);
    p.scale.push_back(g * inv_std);
    p.offset.push_back(b - mean * (g * inv_std));
    p.inv_step.push_back(levels / (6.0f * ag));
    p.step.push_back(ag * (6.0f / levels));
    // channel_params' shift: not clipped to the window, bounded to +-2^24.
    const float sh = levels / 2.0f - std::floor(b / ag * (levels / 6.0f));
    p.shift.push_back(std::min(std::max(sh, -16777216.0f), 16777216.0f));
    p.coef.push_back(p.scale.back());
    p.mean_g.push_back(0.01f * normal(rng));
    p.mean_gx.push_back(0.01f * normal(rng));
  }
  return p;
}

blpa::EncodeArgs encode_args(const Problem& p, float* activation,
                             uint8_t* packed) {
  return {p.x.data(),     p.scale.data(), p.offset.data(), p.inv_step.data(),
          p.shift.data(), p.n,            p.C,             p.bits,
          activation,     packed};
}

blpa::GradArgs grad_args(const Problem& p, const uint8_t* packed, float* dx) {
  blpa::GradArgs a;
  a.packed = packed;
  a.grad_a = p.grad.data();
  a.step = p.step.data();
  a.shift = p.shift.data();
  a.gamma = p.gamma.data();
  a.beta = p.beta.data();
  a.n = p.n;
  a.C = p.C;
  a.bits = p.bits;
  a.coef = p.coef.data();
  a.mean_g = p.mean_g.data();
  a.mean_gx = p.mean_gx.data();
  a.grad_x = dx;
  return a;
}

bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof(float)) == 0; }

// The activations checked: every kind of blpa_activations.h, leaky_relu with
// two slopes.
struct NamedActivation {
  const char* name;
  blpa::ActivationKind kind;
  float negative_slope;
};
const NamedActivation kActivations[] = {
    {"relu", blpa::ActivationKind::kRelu, 0.0f},
    {"relu6", blpa::ActivationKind::kRelu6, 0.0f},
    {"leaky_relu(0.1)", blpa::ActivationKind::kLeakyRelu, 0.1f},
    {"leaky_relu(0.3)", blpa::ActivationKind::kLeakyRelu, 0.3f},
    {"linear", blpa::ActivationKind::kLinear, 0.0f},
    {"silu", blpa::ActivationKind::kSilu, 0.0f},
    {"gelu", blpa::ActivationKind::kGelu, 0.0f},
    {"gelu_approximate", blpa::ActivationKind::kGeluApproximate, 0.0f},
    {"hard_silu", blpa::ActivationKind::kHardSilu, 0.0f},
};

// Whether the GPU gives the CPU's bits for `act` (false: libm calls).
template <typename Act>
bool gpu_bit_exact(const Act&) { return true; }
template <typename F>
bool gpu_bit_exact(const blpa::Smooth<F>&) {
  return std::is_same<F, blpa::HardSiluFn>::value;
}

// Plain per-element versions (no tiles, no channel views, explicit modulo).
struct Naive {
  std::vector<float> act, dec, dx;
  std::vector<uint8_t> packed;
  std::vector<double> sum_g, sum_gx;
  std::vector<double> abs_gx;  // sum |g * x_hat| per channel (tolerances)
};

template <typename Act>
Naive naive(Act act, const Problem& p) {
  Naive r;
  const int per = 8 / p.bits;
  const float top = static_cast<float>((1 << p.bits) - 1);
  r.act.resize(p.n);
  r.dec.resize(p.n);
  r.dx.resize(p.n);
  r.packed.assign(blpa::packed_size(p.n, p.bits), 0);
  r.sum_g.assign(p.C, 0.0);
  r.sum_gx.assign(p.C, 0.0);
  r.abs_gx.assign(p.C, 0.0);
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t c = i % p.C;
    const float y = blpa::bn_apply(p.x[i], p.scale[c], p.offset[c]);
    r.act[i] = act.forward(y);
    const float edge = blpa::mask_edge(p.shift[c], top);
    const uint32_t code = act.encode(y, p.inv_step[c], p.shift[c], edge, top);
    r.packed[i / per] |= static_cast<uint8_t>(code << ((i % per) * p.bits));
    // Every activation codes y > 0 from code >= clip(shift, 1, 2^K - 1)
    // (the reference's mask), saturated windows included; relu6 for the
    // shifts its channel_params give (1 <= shift <= 2^K - 2: else its upper
    // code can fall on the mask edge).
    const bool relu6_off = std::is_same<Act, blpa::Relu6>::value &&
                           !(p.shift[c] >= 1.0f && p.shift[c] <= top - 1.0f);
    if (!relu6_off && blpa::code_positive(code, edge) != (y > 0.0f)) {
      fail("mask != (y > 0) at " + std::to_string(i) + " shift " +
           std::to_string(p.shift[c]) + " code " + std::to_string(code));
    }
  }
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t c = i % p.C;
    const uint32_t code = blpa::unpack_one(r.packed[i / per], i % per, p.bits);
    const float edge = blpa::mask_edge(p.shift[c], top);
    r.dec[i] = act.decode(code, p.step[c], p.shift[c], edge);
    const float yd = blpa::decoded_y(code, p.step[c], p.shift[c], edge);
    const float gy = act.backward(p.grad[i], code, p.step[c], p.shift[c], edge);
    const float xh = blpa::xhat_one(yd, p.beta[c], p.gamma[c]);
    r.sum_g[c] += gy;
    r.sum_gx[c] += gy * xh;
    r.abs_gx[c] += std::fabs(static_cast<double>(gy) * xh);
    r.dx[i] = blpa::grad_input_one(gy, xh, p.coef[c], p.mean_g[c], p.mean_gx[c]);
  }
  return r;
}

struct CpuResult {
  std::vector<float> act, dec, dx, sum_g, sum_gx;
  std::vector<uint8_t> packed;
};

template <typename Act>
CpuResult run_cpu(Act act, const Problem& p, int threads,
                  blpa::cpu::CpuLevel level) {
  CpuResult r;
  const int64_t nbytes = blpa::packed_size(p.n, p.bits);
  r.act.assign(p.n, -7.0f);
  r.dec.assign(p.n, -7.0f);
  r.dx.assign(p.n, -7.0f);
  r.packed.assign(nbytes, 0xAB);
  const blpa::EncodeArgs ea = encode_args(p, r.act.data(), r.packed.data());
  parallel_for(threads, nbytes, [&](int64_t b, int64_t e) {
    blpa::cpu::bn_encode(act, ea, b, e, level);
  });
  const blpa::DecodeArgs da = {r.packed.data(), p.step.data(), p.shift.data(),
                               p.n, p.C, p.bits, r.dec.data()};
  // Smooth activations: on one thread the entry points build their own
  // tables; on more, the tables are built once beforehand, as the ops do.
  auto channels_for = [threads](int64_t total, auto fn) {
    parallel_for(threads, total, fn);
  };
  blpa::cpu::SmoothTables decoded, slope;
  const Act dec_act =
      threads > 1 ? decoded.attach(act, blpa::cpu::Table::kDecoded, p.step.data(),
                                   p.shift.data(), p.C, p.bits, channels_for)
                  : act;
  const Act grad_act =
      threads > 1 ? slope.attach(act, blpa::cpu::Table::kSlope, p.step.data(),
                                 p.shift.data(), p.C, p.bits, channels_for)
                  : act;
  parallel_for(threads, nbytes, [&](int64_t b, int64_t e) {
    blpa::cpu::decode(dec_act, da, b, e, level);
  });
  const blpa::GradArgs ga = grad_args(p, r.packed.data(), r.dx.data());
  parallel_for(threads, nbytes, [&](int64_t b, int64_t e) {
    blpa::cpu::bn_grad_input(grad_act, ga, b, e, level);
  });
  r.sum_g.assign(p.C, -7.0f);
  r.sum_gx.assign(p.C, -7.0f);
  blpa::cpu::bn_grad_reduce(grad_act, ga, level, r.sum_g.data(), r.sum_gx.data(),
                            [&](int64_t blocks, auto fn) {
                              parallel_for(threads, blocks, fn);
                            });
  return r;
}

std::string label(const Problem& p) {
  return "n=" + std::to_string(p.n) + " C=" + std::to_string(p.C) +
         " bits=" + std::to_string(p.bits);
}

void compare_floats(const std::string& what, const std::vector<float>& a,
                    const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!same_bits(a[i], b[i]) && !(std::isnan(a[i]) && std::isnan(b[i]))) {
      fail(what + " at " + std::to_string(i) + ": " + std::to_string(a[i]) +
           " vs " + std::to_string(b[i]));
      return;
    }
  }
}

void compare_sums(const std::string& what, const std::vector<float>& got,
                  const std::vector<double>& want, const std::vector<float>& grad,
                  int64_t C, const std::vector<double>& abs_gx) {
  // Tolerance from float accumulation: relative to the sum of magnitudes,
  // 10 |grad| per element or |g * x_hat| where x_hat is larger (saturated
  // channels, beta up to 1e9 |gamma|).
  std::vector<double> mag(abs_gx);
  for (size_t i = 0; i < grad.size(); ++i) mag[i % C] += 10.0 * std::fabs(grad[i]);
  for (int64_t c = 0; c < C; ++c) {
    const double tol = 1e-5 * mag[c] + 1e-5;
    if (!(std::fabs(got[c] - want[c]) <= tol)) {
      fail(what + " channel " + std::to_string(c) + ": " + std::to_string(got[c]) +
           " vs " + std::to_string(want[c]));
      return;
    }
  }
}

// Every ISA level up to `top`, 1 and 3 threads; returns the levels checked.
template <typename Act>
int check_cpu(Act act, const char* name, const Problem& p,
              blpa::cpu::CpuLevel top) {
  const Naive want = naive(act, p);
  const CpuResult first = run_cpu(act, p, 1, blpa::cpu::kBaseline);
  for (int level = blpa::cpu::kBaseline; level <= top; ++level) {
    for (int threads : {1, 3}) {
      const CpuResult got =
          run_cpu(act, p, threads, static_cast<blpa::cpu::CpuLevel>(level));
      const std::string l = std::string(name) + " " + label(p) +
                            " threads=" + std::to_string(threads) +
                            " isa=" + blpa::cpu::cpu_level_name(level);
      if (got.packed != want.packed) fail("packed codes " + l);
      compare_floats("activation " + l, got.act, want.act);
      compare_floats("decode " + l, got.dec, want.dec);
      compare_floats("bn_grad_input " + l, got.dx, want.dx);
      compare_sums("bn_grad_reduce sum_g " + l, got.sum_g, want.sum_g, p.grad, p.C,
                   want.abs_gx);
      compare_sums("bn_grad_reduce sum_gx " + l, got.sum_gx, want.sum_gx, p.grad, p.C,
                   want.abs_gx);
      // The reduce is deterministic: baseline on one thread gives its bits.
      compare_floats("bn_grad_reduce sum_g bits " + l, got.sum_g, first.sum_g);
      compare_floats("bn_grad_reduce sum_gx bits " + l, got.sum_gx, first.sum_gx);
    }
  }
  return top + 1;
}

#if defined(BLPA_WITH_CUDA)
#define CUDA_OK(expr)                                                     \
  do {                                                                    \
    cudaError_t e_ = (expr);                                              \
    if (e_ != cudaSuccess) {                                              \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), \
              __FILE__, __LINE__);                                        \
      exit(1);                                                            \
    }                                                                     \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty())
    CUDA_OK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t count) {
  std::vector<T> v(count);
  if (count) CUDA_OK(cudaMemcpy(v.data(), d, count * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

bool gpu_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

struct DeviceProblem {
  float *x, *scale, *offset, *inv_step, *step, *shift, *gamma, *beta, *grad,
      *coef, *mean_g, *mean_gx, *act, *dec, *dx, *sum_g, *sum_gx;
  uint8_t* packed;
  blpa::EncodeArgs ea;
  blpa::DecodeArgs da;
  blpa::GradArgs ga;
};

DeviceProblem upload(const Problem& p) {
  DeviceProblem d;
  d.x = to_device(p.x);
  d.scale = to_device(p.scale);
  d.offset = to_device(p.offset);
  d.inv_step = to_device(p.inv_step);
  d.step = to_device(p.step);
  d.shift = to_device(p.shift);
  d.gamma = to_device(p.gamma);
  d.beta = to_device(p.beta);
  d.grad = to_device(p.grad);
  d.coef = to_device(p.coef);
  d.mean_g = to_device(p.mean_g);
  d.mean_gx = to_device(p.mean_gx);
  d.act = to_device(std::vector<float>(p.n));
  d.dec = to_device(std::vector<float>(p.n));
  d.dx = to_device(std::vector<float>(p.n));
  d.sum_g = to_device(std::vector<float>(p.C));
  d.sum_gx = to_device(std::vector<float>(p.C));
  d.packed = to_device(std::vector<uint8_t>(blpa::packed_size(p.n, p.bits)));
  d.ea = {d.x, d.scale, d.offset, d.inv_step, d.shift, p.n, p.C, p.bits, d.act,
          d.packed};
  d.da = {d.packed, d.step, d.shift, p.n, p.C, p.bits, d.dec};
  d.ga.packed = d.packed;
  d.ga.grad_a = d.grad;
  d.ga.step = d.step;
  d.ga.shift = d.shift;
  d.ga.gamma = d.gamma;
  d.ga.beta = d.beta;
  d.ga.n = p.n;
  d.ga.C = p.C;
  d.ga.bits = p.bits;
  d.ga.coef = d.coef;
  d.ga.mean_g = d.mean_g;
  d.ga.mean_gx = d.mean_gx;
  d.ga.grad_x = d.dx;
  return d;
}

void release(DeviceProblem& d) {
  for (void* ptr : {(void*)d.x, (void*)d.scale, (void*)d.offset, (void*)d.inv_step,
                    (void*)d.step, (void*)d.shift, (void*)d.gamma, (void*)d.beta,
                    (void*)d.grad, (void*)d.coef, (void*)d.mean_g, (void*)d.mean_gx,
                    (void*)d.act, (void*)d.dec, (void*)d.dx, (void*)d.sum_g,
                    (void*)d.sum_gx, (void*)d.packed})
    cudaFree(ptr);
}

void launch_ok(int err, const char* what) {
  if (err != 0) {
    fprintf(stderr, "%s launch failed: %s\n", what, blpa::cuda::error_string(err));
    exit(1);
  }
}

// Equal to a few float32 ulp (GPU libm calls): |a - b| <= rtol |b| + atol,
// NaN and infinities where the other has them.
void compare_close(const std::string& what, const std::vector<float>& a,
                   const std::vector<float>& b, float rtol, float atol) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (same_bits(a[i], b[i]) || (std::isnan(a[i]) && std::isnan(b[i]))) continue;
    if (!(std::fabs(a[i] - b[i]) <= rtol * std::fabs(b[i]) + atol)) {
      fail(what + " at " + std::to_string(i) + ": " + std::to_string(a[i]) +
           " vs " + std::to_string(b[i]));
      return;
    }
  }
}

template <typename Act>
void check_gpu(Act act, const char* name, const Problem& p) {
  const CpuResult want = run_cpu(act, p, 1, blpa::cpu::kBaseline);
  const Naive nv = naive(act, p);
  DeviceProblem d = upload(p);
  launch_ok(blpa::cuda::bn_encode(act, d.ea, 0), "encode");
  launch_ok(blpa::cuda::decode(act, d.da, 0), "decode");
  launch_ok(blpa::cuda::bn_grad_input(act, d.ga, 0), "grad_input");
  launch_ok(blpa::cuda::bn_grad_reduce(act, d.ga, d.sum_g, d.sum_gx, 0),
            "grad_reduce");
  CUDA_OK(cudaDeviceSynchronize());
  const std::string l = std::string(name) + " " + label(p) + " GPU";
  if (to_host(d.packed, want.packed.size()) != want.packed) fail("packed codes " + l);
  if (gpu_bit_exact(act)) {
    compare_floats("activation " + l, to_host(d.act, p.n), want.act);
    compare_floats("decode " + l, to_host(d.dec, p.n), want.dec);
    compare_floats("bn_grad_input " + l, to_host(d.dx, p.n), want.dx);
  } else {
    // Values a few ulp apart; the secant slope divides their difference by
    // the step (>= 6 * 0.2 / 256), and grad_x multiplies it by coef * g.
    compare_close("activation " + l, to_host(d.act, p.n), want.act, 1e-5f, 1e-6f);
    compare_close("decode " + l, to_host(d.dec, p.n), want.dec, 1e-5f, 1e-6f);
    compare_close("bn_grad_input " + l, to_host(d.dx, p.n), want.dx, 1e-3f, 1e-2f);
  }
  compare_sums("bn_grad_reduce sum_g " + l, to_host(d.sum_g, p.C), nv.sum_g, p.grad, p.C,
               nv.abs_gx);
  compare_sums("bn_grad_reduce sum_gx " + l, to_host(d.sum_gx, p.C), nv.sum_gx, p.grad, p.C,
               nv.abs_gx);
  release(d);
}

void bench_gpu(const Problem& p, int reps) {
  DeviceProblem d = upload(p);
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  float* copy_dst = nullptr;
  CUDA_OK(cudaMalloc(&copy_dst, p.n * sizeof(float)));
  auto time_it = [&](auto fn) {
    fn();
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaEventRecord(e0));
    for (int r = 0; r < reps; ++r) fn();
    CUDA_OK(cudaEventRecord(e1));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    return ms / 1e3 / reps;
  };
  const double nb = static_cast<double>(blpa::packed_size(p.n, p.bits));
  const double fb = 4.0 * p.n;
  const double t_enc = time_it([&] { blpa::cuda::bn_encode(blpa::Relu(), d.ea, 0); });
  const double t_dec = time_it([&] { blpa::cuda::decode(blpa::Relu(), d.da, 0); });
  const double t_copy = time_it([&] {
    cudaMemcpyAsync(copy_dst, d.x, p.n * sizeof(float), cudaMemcpyDeviceToDevice, 0);
  });
  const double traffic = (fb + fb + nb) + (nb + fb);
  const double gbs = traffic / (t_enc + t_dec) / 1e9;
  const double copy_gbs = 2 * fb / t_copy / 1e9;
  printf("GPU  bits=%d  encode %.3f ms  decode %.3f ms  enc+dec %.1f GB/s  "
         "copy %.1f GB/s  ratio %.2f\n",
         p.bits, t_enc * 1e3, t_dec * 1e3, gbs, copy_gbs, gbs / copy_gbs);
  cudaFree(copy_dst);
  release(d);
}
#endif  // BLPA_WITH_CUDA

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename Fn>
double best_time(int reps, Fn fn) {
  fn();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

void bench_cpu(const Problem& p, int threads, int reps, blpa::cpu::CpuLevel level) {
  const int64_t nbytes = blpa::packed_size(p.n, p.bits);
  std::vector<float> act(p.n), dec(p.n), copy(p.n);
  std::vector<uint8_t> packed(nbytes);
  const blpa::EncodeArgs ea = encode_args(p, act.data(), packed.data());
  const blpa::DecodeArgs da = {packed.data(), p.step.data(), p.shift.data(),
                               p.n, p.C, p.bits, dec.data()};
  const double t_enc = best_time(reps, [&] {
    parallel_for(threads, nbytes, [&](int64_t b, int64_t e) {
      blpa::cpu::bn_encode(blpa::Relu(), ea, b, e, level);
    });
  });
  const double t_dec = best_time(reps, [&] {
    parallel_for(threads, nbytes, [&](int64_t b, int64_t e) {
      blpa::cpu::decode(blpa::Relu(), da, b, e, level);
    });
  });
  const double t_copy = best_time(reps, [&] {
    parallel_for(threads, p.n, [&](int64_t b, int64_t e) {
      memcpy(copy.data() + b, p.x.data() + b, (e - b) * sizeof(float));
    });
  });
  // Bytes read + written: encode reads x, writes relu(y) and the codes;
  // decode reads the codes and writes floats; a copy reads and writes 4n.
  const double fb = 4.0 * p.n, cb = static_cast<double>(nbytes);
  const double gbs = ((fb + fb + cb) + (cb + fb)) / (t_enc + t_dec) / 1e9;
  const double copy_gbs = 2 * fb / t_copy / 1e9;
  printf("CPU  %s  bits=%d  threads=%d  n=%lld  encode %.3f ms  decode %.3f ms  "
         "enc+dec %.2f GB/s  memcpy %.2f GB/s  ratio %.2f\n",
         blpa::cpu::cpu_level_name(level), p.bits, threads,
         static_cast<long long>(p.n), t_enc * 1e3, t_dec * 1e3,
         gbs, copy_gbs, gbs / copy_gbs);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, bench = true;
  int threads = std::max(1u, std::thread::hardware_concurrency());
  int64_t elements = 64LL * 32 * 32 * 64;  // batch 64, 32x32, 64 channels
  const char* isa = nullptr;  // no cap
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--no-bench") bench = false;
    else if (a == "--threads" && i + 1 < argc) threads = atoi(argv[++i]);
    else if (a == "--elements" && i + 1 < argc) elements = atoll(argv[++i]);
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else {
      fprintf(stderr,
              "usage: %s [--quick] [--no-bench] [--threads N] [--elements N] "
              "[--isa avx|avx2|avx512]\n",
              argv[0]);
      return 2;
    }
  }
  if (quick) elements = std::min<int64_t>(elements, 1 << 20);

  const int64_t sizes[][2] = {{1, 1},      {7, 1},       {13, 3},     {97, 5},
                              {1000, 64},  {4099, 17},   {8191, 255}, {8448, 256},
                              {10279, 257}, {65537, 1000}, {300001, 64}, {262147, 1}};
  int checked = 0;
  const blpa::cpu::CpuLevel top = blpa::cpu::usable_cpu_level(isa);
  for (int bits : {2, 4, 8}) {
    for (const auto& s : sizes) {
      const Problem p =
          make_problem(s[0], s[1], bits, 1234u + static_cast<uint32_t>(s[0]));
      for (const NamedActivation& na : kActivations) {
        blpa::with_activation(na.kind, na.negative_slope, bits, [&](auto act) {
          checked += check_cpu(act, na.name, p, top);
        });
      }
    }
  }
  printf("CPU checks: %d problems x activations (%d activations, ISA levels up "
         "to %s) x 2 thread counts, %d mismatches\n",
         checked, static_cast<int>(sizeof(kActivations) / sizeof(kActivations[0])),
         blpa::cpu::cpu_level_name(top), g_failures);

#if defined(BLPA_WITH_CUDA)
  const bool gpu = gpu_available();
  if (gpu) {
    for (int bits : {2, 4, 8})
      for (const auto& s : sizes)
        for (const NamedActivation& na : kActivations) {
          const Problem p =
              make_problem(s[0], s[1], bits, 99u + static_cast<uint32_t>(s[0]));
          blpa::with_activation(na.kind, na.negative_slope, bits,
                                [&](auto act) { check_gpu(act, na.name, p); });
        }
    printf("GPU checks done, %d mismatches in total\n", g_failures);
  } else {
    printf("GPU checks skipped: no CUDA device\n");
  }
#endif

  if (bench && g_failures == 0) {
    for (int bits : {2, 4, 8}) {
      const Problem p = make_problem(elements, 64, bits, 7u);
      bench_cpu(p, threads, quick ? 3 : 10, top);
#if defined(BLPA_WITH_CUDA)
      if (gpu) bench_gpu(p, quick ? 5 : 50);
#endif
    }
  }
  if (g_failures) {
    fprintf(stderr, "FAILED: %d mismatches\n", g_failures);
    return 1;
  }
  printf("OK\n");
  return 0;
}
