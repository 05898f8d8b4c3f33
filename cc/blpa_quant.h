// keras_blpa: K-bit activation codes (Chakrabarti & Moseley, 2019), framework free.
//
// One header holding
//   * the bin math as inline functions usable from host and CUDA device code
//     (BLPA_HOST_DEVICE), written so that every float operation rounds exactly
//     like TensorFlow's separate Mul / Add / Sub / Div ops (no FMA contraction:
//     compile host code with -ffp-contract=off; device code uses __f*_rn);
//   * the CPU loops of the four fused block kernels, each over a range
//     [byte_begin, byte_end) of PACKED BYTES, so that a caller can shard a tensor
//     over any thread pool (TensorFlow's, or std::thread in the standalone test).
//
// Semantics are those of keras_blpa/reference.py (the oracle):
//   y      = x * scale + offset                       (BN folded, channels last)
//   t      = floor(y * inv_step) + shift
//   t      = y > 0 ? max(t, shift) : min(t, shift - 1)
//   code   = clip(t, 0, 2^K - 1), NaN anywhere -> 0
//   decode = (code + 0.5 - shift) * step, mask = code >= shift
//   x_hat  = (decode - beta) / gamma
// Tensors are flattened row-major with channel = flat_index % C. Packing: 8 bits
// one code per byte, 4 bits two per byte (element 2i in the low nibble), 2 bits
// four per byte (element 4i+j at bit 2j); the last byte is zero padded.
#ifndef KERAS_BLPA_CC_BLPA_QUANT_H_
#define KERAS_BLPA_CC_BLPA_QUANT_H_

#include <stddef.h>
#include <stdint.h>

#include <cmath>

#if defined(__CUDACC__)
#define BLPA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BLPA_HOST_DEVICE inline
#endif

namespace blpa {

// ---------------------------------------------------------------------------
// Sizes.

BLPA_HOST_DEVICE int codes_per_byte(int bits) { return 8 / bits; }

BLPA_HOST_DEVICE bool valid_bits(int bits) {
  return bits == 2 || bits == 4 || bits == 8;
}

// Bytes holding n codes of `bits` bits: ceil(n * bits / 8).
BLPA_HOST_DEVICE int64_t packed_size(int64_t n, int bits) {
  const int64_t per = 8 / bits;
  return (n + per - 1) / per;
}

// ---------------------------------------------------------------------------
// Correctly rounded float arithmetic, one rounding per operation (like TF).

BLPA_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

BLPA_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BLPA_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

BLPA_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

BLPA_HOST_DEVICE float floor_f(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}

// ---------------------------------------------------------------------------
// Bin math, one element.

// BN output from the block input: TF's Mul then Add.
BLPA_HOST_DEVICE float bn_apply(float x, float scale, float offset) {
  return add_rn(mul_rn(x, scale), offset);
}

// tf.nn.relu: negative -> 0, while NaN and -0 pass through unchanged.
BLPA_HOST_DEVICE float relu(float y) { return y < 0.0f ? 0.0f : y; }

// The K-bit code of y (top = 2^K - 1 as a float).
BLPA_HOST_DEVICE uint32_t encode_one(float y, float inv_step, float shift,
                                     float top) {
  const float t = add_rn(floor_f(mul_rn(y, inv_step)), shift);
  // TF's max/min/clip propagate NaN and the reference then maps NaN to code 0.
  // t is NaN whenever y, inv_step or shift is (or on inf - inf), and shift - 1
  // is NaN only if shift is, so testing t once covers every case.
  const bool is_nan = !(t == t);
  // Both sides computed unconditionally, then selected: branch free, so the
  // CPU loops vectorise.
  const float below = sub_rn(shift, 1.0f);
  const float r_pos = t < shift ? shift : t;
  const float r_neg = t > below ? below : t;
  float r = y > 0.0f ? r_pos : r_neg;
  r = r > top ? top : r;
  r = r < 0.0f ? 0.0f : r;
  r = is_nan ? 0.0f : r;
  return static_cast<uint32_t>(static_cast<int32_t>(r));
}

// Bin centre of a code: (code + 0.5 - shift) * step.
BLPA_HOST_DEVICE float decode_one(uint32_t code, float step, float shift) {
  const float c = static_cast<float>(static_cast<int32_t>(code));
  return mul_rn(sub_rn(add_rn(c, 0.5f), shift), step);
}

// Exact ReLU mask (y > 0) read back from the code.
BLPA_HOST_DEVICE bool mask_one(uint32_t code, float shift) {
  return static_cast<float>(static_cast<int32_t>(code)) >= shift;
}

// Decoded ReLU output: bin centre where the mask is on, else 0.
BLPA_HOST_DEVICE float decode_relu_one(uint32_t code, float step, float shift) {
  return mask_one(code, shift) ? decode_one(code, step, shift) : 0.0f;
}

// Normalised value from the decoded BN output.
BLPA_HOST_DEVICE float xhat_one(float y_dec, float beta, float gamma) {
  return div_rn(sub_rn(y_dec, beta), gamma);
}

// BN input gradient of one element: coef * ((g - mean_g) - x_hat * mean_gx).
BLPA_HOST_DEVICE float grad_input_one(float g, float x_hat, float coef,
                                      float mean_g, float mean_gx) {
  return mul_rn(coef, sub_rn(sub_rn(g, mean_g), mul_rn(x_hat, mean_gx)));
}

// Code of element j (0 <= j < codes_per_byte) inside a packed byte.
BLPA_HOST_DEVICE uint32_t unpack_one(uint32_t byte, int j, int bits) {
  return (byte >> (j * bits)) & ((1u << bits) - 1u);
}

// ---------------------------------------------------------------------------
// Kernel arguments (raw pointers; all per-channel vectors have C floats).

struct EncodeArgs {
  const float* x;         // [n]
  const float* scale;     // [C]  gamma / std
  const float* offset;    // [C]  beta - mean * scale
  const float* inv_step;  // [C]
  const float* shift;     // [C]
  int64_t n;
  int64_t C;
  int bits;
  float* relu_out;   // [n]  relu(y)
  uint8_t* packed;   // [packed_size(n, bits)]
};

struct DecodeArgs {
  const uint8_t* packed;
  const float* step;   // [C]
  const float* shift;  // [C]
  int64_t n;
  int64_t C;
  int bits;
  float* out;  // [n]  decoded relu output
};

struct GradArgs {
  const uint8_t* packed;
  const float* grad_a;  // [n]  gradient w.r.t. the ReLU output
  const float* step;    // [C]
  const float* shift;   // [C]
  const float* gamma;   // [C]
  const float* beta;    // [C]
  int64_t n;
  int64_t C;
  int bits;
  // bn_grad_input only:
  const float* coef;     // [C]
  const float* mean_g;   // [C]
  const float* mean_gx;  // [C]
  float* grad_x;         // [n]
};

}  // namespace blpa

#if !defined(__CUDACC__)
// ---------------------------------------------------------------------------
// CPU loops (host only).

#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(BLPA_NO_MULTIVERSION)
#define BLPA_X86_DISPATCH 1
#define BLPA_INLINE inline __attribute__((always_inline))
#else
#define BLPA_INLINE inline
#endif

namespace blpa {
namespace cpu {

// Elements processed per tile: codes of a tile live in a small stack buffer
// between the arithmetic loop (vectorised over channels) and the bit packing.
constexpr int64_t kTile = 2048;
// Channel counts below this are expanded into a periodic parameter buffer so
// the inner loops stay long for small C (C = 1, 3, ...).
constexpr int64_t kSmallC = 256;
constexpr int64_t kMaxParams = 6;
constexpr int64_t kExpanded = kSmallC + 2 * kSmallC;

// Per-channel vectors viewed from a channel c: `ptr(j, c)[k]` is parameter j
// of channel (c + k) % C for 0 <= k < run(c, remaining).
class ChannelView {
 public:
  BLPA_INLINE ChannelView(const float* const* params, int count, int64_t C)
      : count_(count), C_(C) {
    expanded_ = C < kSmallC;
    if (expanded_) {
      period_ = C * ((kSmallC + C - 1) / C);  // multiple of C, >= kSmallC
      const int64_t len = period_ + C;
      for (int j = 0; j < count; ++j) {
        for (int64_t i = 0; i < len; ++i) buf_[j][i] = params[j][i % C];
        ptr_[j] = buf_[j];
      }
    } else {
      period_ = C;
      for (int j = 0; j < count; ++j) ptr_[j] = params[j];
    }
  }
  // Length of the contiguous run starting at channel c.
  BLPA_INLINE int64_t run(int64_t c, int64_t remaining) const {
    return std::min(remaining, expanded_ ? period_ : C_ - c);
  }
  // Number of accumulator slots indexed by c + k (fold with % C).
  int64_t slots() const { return expanded_ ? period_ + C_ : C_; }
  BLPA_INLINE const float* ptr(int j, int64_t c) const { return ptr_[j] + c; }

 private:
  int count_;
  int64_t C_;
  bool expanded_;
  int64_t period_;
  const float* ptr_[kMaxParams];
  float buf_[kMaxParams][kExpanded];
};

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
// Word views of the code buffer: one packed byte <-> one 16-bit (4 bits) or
// 32-bit (2 bits) word of codes, contiguous on both sides, so the loops
// vectorise. may_alias makes the views legal over the uint8_t buffer.
#define BLPA_WORD_PACKING 1
typedef uint16_t __attribute__((may_alias)) blpa_u16a;
typedef uint32_t __attribute__((may_alias)) blpa_u32a;
#endif

template <int BITS>
BLPA_INLINE void pack_codes(const uint8_t* codes, int64_t nbytes, uint8_t* out) {
  if (BITS == 8) {
    std::memcpy(out, codes, nbytes);
  } else if (BITS == 4) {
#if defined(BLPA_WORD_PACKING)
    const blpa_u16a* w = reinterpret_cast<const blpa_u16a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = w[b];  // code 2b in bits 0-7, code 2b+1 in bits 8-15
      out[b] = static_cast<uint8_t>((v & 0xFu) | ((v >> 4) & 0xF0u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      out[b] = static_cast<uint8_t>(codes[2 * b] | (codes[2 * b + 1] << 4));
    }
#endif
  } else {
#if defined(BLPA_WORD_PACKING)
    const blpa_u32a* w = reinterpret_cast<const blpa_u32a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = w[b];  // code 4b+j in bits 8j .. 8j+7
      out[b] = static_cast<uint8_t>((v & 0x3u) | ((v >> 6) & 0xCu) |
                                    ((v >> 12) & 0x30u) | ((v >> 18) & 0xC0u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      out[b] = static_cast<uint8_t>(codes[4 * b] | (codes[4 * b + 1] << 2) |
                                    (codes[4 * b + 2] << 4) |
                                    (codes[4 * b + 3] << 6));
    }
#endif
  }
}

template <int BITS>
BLPA_INLINE void unpack_codes(const uint8_t* in, int64_t nbytes, uint8_t* codes) {
  if (BITS == 8) {
    std::memcpy(codes, in, nbytes);
  } else if (BITS == 4) {
#if defined(BLPA_WORD_PACKING)
    blpa_u16a* w = reinterpret_cast<blpa_u16a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = in[b];
      w[b] = static_cast<uint16_t>((v & 0xFu) | ((v << 4) & 0xF00u));
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint8_t v = in[b];
      codes[2 * b] = v & 15;
      codes[2 * b + 1] = v >> 4;
    }
#endif
  } else {
#if defined(BLPA_WORD_PACKING)
    blpa_u32a* w = reinterpret_cast<blpa_u32a*>(codes);
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint32_t v = in[b];
      w[b] = (v & 0x3u) | ((v << 6) & 0x300u) | ((v << 12) & 0x30000u) |
             ((v << 18) & 0x3000000u);
    }
#else
    for (int64_t b = 0; b < nbytes; ++b) {
      const uint8_t v = in[b];
      codes[4 * b] = v & 3;
      codes[4 * b + 1] = (v >> 2) & 3;
      codes[4 * b + 2] = (v >> 4) & 3;
      codes[4 * b + 3] = v >> 6;
    }
#endif
  }
}

// Element range [e0, e1) of packed bytes [byte_begin, byte_end).
BLPA_INLINE void element_range(int64_t n, int bits, int64_t byte_begin,
                          int64_t byte_end, int64_t* e0, int64_t* e1) {
  const int64_t per = 8 / bits;
  *e0 = std::min(n, byte_begin * per);
  *e1 = std::min(n, byte_end * per);
}

template <int BITS>
BLPA_INLINE void bn_relu_encode_range(const EncodeArgs& a, int64_t byte_begin,
                                 int64_t byte_end) {
  constexpr int64_t per = 8 / BITS;
  const float top = static_cast<float>((1 << BITS) - 1);
  int64_t e0, e1;
  element_range(a.n, BITS, byte_begin, byte_end, &e0, &e1);
  if (e0 >= e1) return;
  const float* params[4] = {a.scale, a.offset, a.inv_step, a.shift};
  ChannelView view(params, 4, a.C);
  alignas(64) uint8_t codes[kTile];
  int64_t c = e0 % a.C;
  for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
    const int64_t t1 = std::min(e1, t0 + kTile);
    for (int64_t i = t0; i < t1;) {
      const int64_t run = view.run(c, t1 - i);
      const float* __restrict__ x = a.x + i;
      float* __restrict__ out = a.relu_out + i;
      uint8_t* __restrict__ cd = codes + (i - t0);
      const float* __restrict__ sc = view.ptr(0, c);
      const float* __restrict__ of = view.ptr(1, c);
      const float* __restrict__ is = view.ptr(2, c);
      const float* __restrict__ sh = view.ptr(3, c);
      for (int64_t k = 0; k < run; ++k) {
        const float y = bn_apply(x[k], sc[k], of[k]);
        out[k] = relu(y);
        cd[k] = static_cast<uint8_t>(encode_one(y, is[k], sh[k], top));
      }
      i += run;
      c = (c + run) % a.C;
    }
    const int64_t count = t1 - t0;
    const int64_t nbytes = (count + per - 1) / per;
    for (int64_t k = count; k < nbytes * per; ++k) codes[k] = 0;  // padding
    pack_codes<BITS>(codes, nbytes, a.packed + t0 / per);
  }
}

template <int BITS>
BLPA_INLINE void decode_relu_range(const DecodeArgs& a, int64_t byte_begin,
                              int64_t byte_end) {
  constexpr int64_t per = 8 / BITS;
  int64_t e0, e1;
  element_range(a.n, BITS, byte_begin, byte_end, &e0, &e1);
  if (e0 >= e1) return;
  const float* params[2] = {a.step, a.shift};
  ChannelView view(params, 2, a.C);
  alignas(64) uint8_t codes[kTile];
  int64_t c = e0 % a.C;
  for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
    const int64_t t1 = std::min(e1, t0 + kTile);
    unpack_codes<BITS>(a.packed + t0 / per, (t1 - t0 + per - 1) / per, codes);
    for (int64_t i = t0; i < t1;) {
      const int64_t run = view.run(c, t1 - i);
      const uint8_t* __restrict__ cd = codes + (i - t0);
      float* __restrict__ out = a.out + i;
      const float* __restrict__ st = view.ptr(0, c);
      const float* __restrict__ sh = view.ptr(1, c);
      for (int64_t k = 0; k < run; ++k) {
        out[k] = decode_relu_one(cd[k], st[k], sh[k]);
      }
      i += run;
      c = (c + run) % a.C;
    }
  }
}

// Adds the per-channel sums of g and g * x_hat over the range to sum_g and
// sum_gx (C doubles each); `scratch` must hold 2 * reduce_scratch_size(C)
// doubles.
inline int64_t reduce_scratch_size(int64_t C) {
  return C < kSmallC ? C * ((kSmallC + C - 1) / C) + C : C;
}

template <int BITS>
BLPA_INLINE void bn_grad_reduce_range(const GradArgs& a, int64_t byte_begin,
                                 int64_t byte_end, double* sum_g,
                                 double* sum_gx, double* scratch) {
  constexpr int64_t per = 8 / BITS;
  int64_t e0, e1;
  element_range(a.n, BITS, byte_begin, byte_end, &e0, &e1);
  if (e0 >= e1) return;
  const float* params[4] = {a.step, a.shift, a.gamma, a.beta};
  ChannelView view(params, 4, a.C);
  const int64_t slots = view.slots();
  double* __restrict__ acc_g = scratch;
  double* __restrict__ acc_gx = scratch + slots;
  std::fill(scratch, scratch + 2 * slots, 0.0);
  alignas(64) uint8_t codes[kTile];
  int64_t c = e0 % a.C;
  for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
    const int64_t t1 = std::min(e1, t0 + kTile);
    unpack_codes<BITS>(a.packed + t0 / per, (t1 - t0 + per - 1) / per, codes);
    for (int64_t i = t0; i < t1;) {
      const int64_t run = view.run(c, t1 - i);
      const uint8_t* __restrict__ cd = codes + (i - t0);
      const float* __restrict__ g = a.grad_a + i;
      const float* __restrict__ st = view.ptr(0, c);
      const float* __restrict__ sh = view.ptr(1, c);
      const float* __restrict__ ga = view.ptr(2, c);
      const float* __restrict__ be = view.ptr(3, c);
      double* __restrict__ ag = acc_g + c;
      double* __restrict__ agx = acc_gx + c;
      for (int64_t k = 0; k < run; ++k) {
        const float y_dec = decode_one(cd[k], st[k], sh[k]);
        const float gk = g[k];  // unconditional load keeps the loop branch free
        const float gy = mask_one(cd[k], sh[k]) ? gk : 0.0f;
        const float xh = xhat_one(y_dec, be[k], ga[k]);
        ag[k] += static_cast<double>(gy);
        agx[k] += static_cast<double>(mul_rn(gy, xh));
      }
      i += run;
      c = (c + run) % a.C;
    }
  }
  for (int64_t j = 0; j < slots; ++j) {
    sum_g[j % a.C] += acc_g[j];
    sum_gx[j % a.C] += acc_gx[j];
  }
}

template <int BITS>
BLPA_INLINE void bn_grad_input_range(const GradArgs& a, int64_t byte_begin,
                                int64_t byte_end) {
  constexpr int64_t per = 8 / BITS;
  int64_t e0, e1;
  element_range(a.n, BITS, byte_begin, byte_end, &e0, &e1);
  if (e0 >= e1) return;
  const float* params[6] = {a.step, a.shift, a.gamma,
                            a.beta, a.coef,  a.mean_g};
  ChannelView view(params, 6, a.C);
  // mean_gx needs a 7th vector: a second view keeps the same run lengths.
  const float* params2[1] = {a.mean_gx};
  ChannelView view2(params2, 1, a.C);
  alignas(64) uint8_t codes[kTile];
  int64_t c = e0 % a.C;
  for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
    const int64_t t1 = std::min(e1, t0 + kTile);
    unpack_codes<BITS>(a.packed + t0 / per, (t1 - t0 + per - 1) / per, codes);
    for (int64_t i = t0; i < t1;) {
      const int64_t run = view.run(c, t1 - i);
      const uint8_t* __restrict__ cd = codes + (i - t0);
      const float* __restrict__ g = a.grad_a + i;
      float* __restrict__ dx = a.grad_x + i;
      const float* __restrict__ st = view.ptr(0, c);
      const float* __restrict__ sh = view.ptr(1, c);
      const float* __restrict__ ga = view.ptr(2, c);
      const float* __restrict__ be = view.ptr(3, c);
      const float* __restrict__ co = view.ptr(4, c);
      const float* __restrict__ mg = view.ptr(5, c);
      const float* __restrict__ mgx = view2.ptr(0, c);
      for (int64_t k = 0; k < run; ++k) {
        const float y_dec = decode_one(cd[k], st[k], sh[k]);
        const float gk = g[k];  // unconditional load keeps the loop branch free
        const float gy = mask_one(cd[k], sh[k]) ? gk : 0.0f;
        const float xh = xhat_one(y_dec, be[k], ga[k]);
        dx[k] = grad_input_one(gy, xh, co[k], mg[k], mgx[k]);
      }
      i += run;
      c = (c + run) % a.C;
    }
  }
}

// ---------------------------------------------------------------------------
// Instruction-set dispatch. The loops above are compiled three times: for the
// baseline of the build (AVX, which TensorFlow wheels require), AVX2 and
// AVX-512 (F/BW/VL/DQ), and the best one the CPU supports runs. FMA is never
// enabled, and every level gives bit-identical results (checked by
// blpa_quant_test.cc). KERAS_BLPA_CPU_ISA=avx|avx2|avx512 caps the level.

enum CpuLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline int& cpu_level_override() {
  static int level = -1;  // -1: automatic
  return level;
}

inline int detected_cpu_level() {
#if defined(BLPA_X86_DISPATCH)
  static const int level = [] {
    __builtin_cpu_init();
    int l = kBaseline;
    if (__builtin_cpu_supports("avx2")) l = kAvx2;
    if (l == kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      l = kAvx512;
    const char* cap = getenv("KERAS_BLPA_CPU_ISA");
    if (cap != nullptr) {
      if (strcmp(cap, "avx") == 0) l = kBaseline;
      if (strcmp(cap, "avx2") == 0 && l > kAvx2) l = kAvx2;
    }
    return l;
  }();
  return level;
#else
  return kBaseline;
#endif
}

// The level in use (an override above the detected level is ignored).
inline int cpu_level() {
  const int detected = detected_cpu_level();
  const int o = cpu_level_override();
  return (o >= 0 && o < detected) ? o : detected;
}

inline const char* cpu_level_name(int level) {
  return level == kAvx512 ? "avx512" : level == kAvx2 ? "avx2" : "baseline";
}

#if defined(BLPA_X86_DISPATCH)
#define BLPA_TARGET_AVX2 __attribute__((target("avx2")))
#define BLPA_TARGET_AVX512 \
  __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq")))
#define BLPA_MULTIVERSION(name, params, args)                            \
  template <int BITS>                                                    \
  void name##_baseline params { name##_range<BITS> args; }               \
  template <int BITS>                                                    \
  BLPA_TARGET_AVX2 void name##_avx2 params { name##_range<BITS> args; }  \
  template <int BITS>                                                    \
  BLPA_TARGET_AVX512 void name##_avx512 params { name##_range<BITS> args; } \
  template <int BITS>                                                    \
  inline void name##_dispatch params {                                   \
    switch (cpu_level()) {                                               \
      case kAvx512: return name##_avx512<BITS> args;                     \
      case kAvx2: return name##_avx2<BITS> args;                         \
      default: return name##_baseline<BITS> args;                        \
    }                                                                    \
  }
#else
#define BLPA_MULTIVERSION(name, params, args) \
  template <int BITS>                         \
  inline void name##_dispatch params { name##_range<BITS> args; }
#endif

BLPA_MULTIVERSION(bn_relu_encode, (const EncodeArgs& a, int64_t b0, int64_t b1),
                  (a, b0, b1))
BLPA_MULTIVERSION(decode_relu, (const DecodeArgs& a, int64_t b0, int64_t b1),
                  (a, b0, b1))
BLPA_MULTIVERSION(bn_grad_reduce,
                  (const GradArgs& a, int64_t b0, int64_t b1, double* sum_g,
                   double* sum_gx, double* scratch),
                  (a, b0, b1, sum_g, sum_gx, scratch))
BLPA_MULTIVERSION(bn_grad_input, (const GradArgs& a, int64_t b0, int64_t b1),
                  (a, b0, b1))
#undef BLPA_MULTIVERSION

// Entry points: dispatch on bits (callers validate bits with valid_bits).
inline void bn_relu_encode(const EncodeArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 2: return bn_relu_encode_dispatch<2>(a, b0, b1);
    case 4: return bn_relu_encode_dispatch<4>(a, b0, b1);
    default: return bn_relu_encode_dispatch<8>(a, b0, b1);
  }
}

inline void decode_relu(const DecodeArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 2: return decode_relu_dispatch<2>(a, b0, b1);
    case 4: return decode_relu_dispatch<4>(a, b0, b1);
    default: return decode_relu_dispatch<8>(a, b0, b1);
  }
}

inline void bn_grad_reduce(const GradArgs& a, int64_t b0, int64_t b1,
                           double* sum_g, double* sum_gx, double* scratch) {
  switch (a.bits) {
    case 2: return bn_grad_reduce_dispatch<2>(a, b0, b1, sum_g, sum_gx, scratch);
    case 4: return bn_grad_reduce_dispatch<4>(a, b0, b1, sum_g, sum_gx, scratch);
    default: return bn_grad_reduce_dispatch<8>(a, b0, b1, sum_g, sum_gx, scratch);
  }
}

inline void bn_grad_input(const GradArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 2: return bn_grad_input_dispatch<2>(a, b0, b1);
    case 4: return bn_grad_input_dispatch<4>(a, b0, b1);
    default: return bn_grad_input_dispatch<8>(a, b0, b1);
  }
}

// Fixed partition of the packed bytes into blocks for the reduction: the
// result depends only on the tensor size, never on the number of threads.
constexpr int64_t kReduceBlockBytes = 1 << 15;

inline int64_t reduce_num_blocks(int64_t nbytes) {
  return std::max<int64_t>(1, (nbytes + kReduceBlockBytes - 1) /
                                  kReduceBlockBytes);
}

}  // namespace cpu
}  // namespace blpa
#endif  // !__CUDACC__

#endif  // KERAS_BLPA_CC_BLPA_QUANT_H_
