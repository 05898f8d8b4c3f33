// keras_blpa: K-bit activation codes (Chakrabarti & Moseley, 2019), framework free.
//
// The bin math shared by the CPU loops (blpa_cpu.h) and the CUDA kernels
// (blpa_quant_cuda.cu): inline functions usable from host and device code
// (BLPA_HOST_DEVICE), written so that every float operation rounds exactly
// like TensorFlow's separate Mul / Add / Sub / Div ops (no FMA contraction:
// compile host code with -ffp-contract=off; device code uses __f*_rn), and the
// argument structs of the four fused block kernels. What depends on the
// activation (its value, code rule, decoded value and backward) is in
// blpa_activations.h.
//
// Semantics are those of keras_blpa/backends/tensorflow/reference.py (the
// oracle); for ReLU:
//   y      = x * scale + offset                       (BN folded, channels last)
//   edge   = clip(shift, 1, 2^K - 1)                  (per channel; = shift
//            where the window contains 0, 1 <= shift <= 2^K - 1)
//   t      = floor(y * inv_step) + shift
//   t      = y > 0 ? max(t, edge) : min(t, edge - 1)
//   code   = clip(t, 0, 2^K - 1), NaN anywhere -> 0
//   mask   = code >= edge                             (exactly y > 0)
//   centre = (code + (0.5 - shift)) * step
//   decode = mask ? max(centre, 0) : min(centre, 0)   (no-op where edge = shift)
//   x_hat  = (decode - beta) / gamma
// shift itself is not clipped (the reference bounds it to +-2^24): a window
// wholly above 0 (shift < 1) keeps code 0 for y <= 0 alone, one wholly below 0
// (shift > 2^K - 1) the top code for y > 0 alone.
// Codes, activations and decoded values match the reference bit for bit; the
// gradient kernels evaluate the same sums in another order (x_hat per element),
// so they agree with it to rounding.
// Tensors are flattened row-major with channel = flat_index % C. Packing: 8 bits
// one code per byte, 4 bits two per byte (element 2i in the low nibble), 2 bits
// four per byte (element 4i+j at bit 2j); the last byte is zero padded.
#ifndef KERAS_BLPA_CC_BLPA_BINS_H_
#define KERAS_BLPA_CC_BLPA_BINS_H_
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

// Unclipped code of y's bin: floor(y * inv_step) + shift.
BLPA_HOST_DEVICE float bin_of(float y, float inv_step, float shift) {
  return add_rn(floor_f(mul_rn(y, inv_step)), shift);
}

// Puts a breakpoint of the activation on the edge between codes edge - 1 and
// edge: t is raised to at least edge where `above`, else lowered to at most
// edge - 1, so the code alone tells the two sides apart. Both sides computed,
// then selected: branch free, so the CPU loops vectorise; a NaN t stays NaN.
BLPA_HOST_DEVICE float split_at_edge(float t, bool above, float edge) {
  const float below = sub_rn(edge, 1.0f);
  const float r_above = t < edge ? edge : t;
  const float r_below = t > below ? below : t;
  return above ? r_above : r_below;
}

// The K-bit code of an unclipped code t (top = 2^K - 1 as a float), NaN -> 0
// as in the reference (where TF's max/min/clip propagate NaN). t is NaN when
// y, inv_step or shift is, or on 0 * inf or inf - inf; comparisons with NaN are
// false, so a NaN stays NaN through the clip and through an activation's rule
// that keeps it so (split_at_edge does): one test at the end covers every case.
BLPA_HOST_DEVICE uint32_t code_of(float t, float top) {
  float r = t > top ? top : t;
  r = r < 0.0f ? 0.0f : r;
  r = r == r ? r : 0.0f;
  return static_cast<uint32_t>(static_cast<int32_t>(r));
}

// The mask edge, the first code of y > 0 (ReLU's threshold y = 0 lies on the
// edge between codes edge - 1 and edge): clip(shift, 1, top), top = 2^K - 1
// as a float, as the reference's mask_edge; a NaN shift stays NaN. A
// per-channel value: the CPU kernels compute it once per channel (EdgeRow,
// blpa_cpu.h) and pass it to the activation beside shift.
BLPA_HOST_DEVICE float mask_edge(float shift, float top) {
  const float e = shift < 1.0f ? 1.0f : shift;
  return e > top ? top : e;
}

// The mask of a code, exactly y > 0: code >= edge.
BLPA_HOST_DEVICE bool code_positive(uint32_t code, float edge) {
  return static_cast<float>(static_cast<int32_t>(code)) >= edge;
}

// Bin centre of a code: (code + (0.5 - shift)) * step (unclamped), rounded in
// the reference's order (exact either way for |shift| <= 2^K, not for a
// saturated shift near its bound 2^24).
BLPA_HOST_DEVICE float bin_centre(uint32_t code, float step, float shift) {
  const float c = static_cast<float>(static_cast<int32_t>(code));
  return mul_rn(add_rn(c, sub_rn(0.5f, shift)), step);
}

// The decoded BN output y_dec: the bin centre kept on the side of 0 that the
// code's mask gives, max(centre, 0) where `positive`, else min(centre, 0)
// (TF's maximum / minimum: NaN propagates, a clamped value is +0). A no-op
// where 1 <= shift <= top; it matters for the end codes of saturated windows.
BLPA_HOST_DEVICE float keep_side(float centre, bool positive) {
  const float up = centre < 0.0f ? 0.0f : centre;
  const float down = centre > 0.0f ? 0.0f : centre;
  return positive ? up : down;
}

BLPA_HOST_DEVICE float decoded_y(uint32_t code, float step, float shift,
                                 float edge) {
  return keep_side(bin_centre(code, step, shift), code_positive(code, edge));
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
  float* activation;  // [n]  act.forward(y)
  uint8_t* packed;    // [packed_size(n, bits)]
};

struct DecodeArgs {
  const uint8_t* packed;
  const float* step;   // [C]
  const float* shift;  // [C]
  int64_t n;
  int64_t C;
  int bits;
  float* out;  // [n]  act.decode(code)
};

struct GradArgs {
  const uint8_t* packed;
  const float* grad_a;  // [n]  gradient w.r.t. the activation output
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

#endif  // KERAS_BLPA_CC_BLPA_BINS_H_
