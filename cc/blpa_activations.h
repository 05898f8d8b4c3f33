// keras_blpa: the activations of the fused block kernels, one struct each.
//
// Every kernel (blpa_cpu.h, blpa_quant_cuda.cu) is a template over an
// activation object `act`, passed by value down to the element loop (so a
// struct may hold constants, e.g. a slope), which calls four const members.
// Each is BLPA_HOST_DEVICE, uses the rounding helpers of blpa_bins.h (the
// results must not depend on the CPU level or on CPU versus GPU) and is branch
// free (selects, no if), so the CPU loops vectorise:
//   float forward(float y)
//       the forward output a = f(y), bit for bit as the pure-TF path gives it;
//   uint32_t encode(float y, float inv_step, float shift, float edge,
//                   float top)
//       the code of y: code_of(rule(bin_of(y, inv_step, shift)), top), the
//       rule putting each breakpoint of f on a bin edge (split_at_edge);
//   float decode(uint32_t code, float step, float shift, float edge)
//       the output a rebuilt from the code, for the backward pass;
//   float backward(float g, uint32_t code, float step, float shift,
//                  float edge)
//       dL/dy from g = dL/da (g arrives loaded: no conditional load), with
//       f'(y) rebuilt from the code.
// `edge` is the channel's mask edge mask_edge(shift, top) (blpa_bins.h), the
// first code of y > 0, computed per channel by the callers (it equals shift
// where the window contains 0, 1 <= shift <= top).
// The BN part (x_hat from bin_centre) is the same for every activation. What
// a struct needs beyond the four arguments it holds as members, built once
// per call by with_activation: leaky_relu's slope, and top = 2^K - 1 for
// relu6's upper breakpoint and the smooth activations' end bins. A new
// activation is one struct here, its name in activation_kind and
// with_activation (the ops' `activation` attr), one BLPA_CUDA_ACTIVATION line
// in blpa_quant_cuda.cu (the CPU kernels are instantiated where they are
// called), and its entry in the activation list of blpa_quant_test.cc.
#ifndef KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
#define KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
#include <stdint.h>

#include <cmath>
#include <cstring>

#include "cc/blpa_bins.h"

namespace blpa {

// The ReLU code (0 on a bin edge), shared by every activation: the breakpoint
// y = 0 is the edge between codes edge - 1 and edge, so the mask code >= edge
// is exactly y > 0, also for a saturated window (shift < 1 or > top, where
// edge != shift).
BLPA_HOST_DEVICE float relu_split(float y, float inv_step, float shift,
                                  float edge) {
  return split_at_edge(bin_of(y, inv_step, shift), y > 0.0f, edge);
}

BLPA_HOST_DEVICE uint32_t relu_code(float y, float inv_step, float shift,
                                    float edge, float top) {
  return code_of(relu_split(y, inv_step, shift, edge), top);
}

// ReLU, the reference behaviour.
struct Relu {
  // Like tf.nn.relu: negative -> 0, while NaN and -0 pass through unchanged.
  BLPA_HOST_DEVICE float forward(float y) const { return y < 0.0f ? 0.0f : y; }

  BLPA_HOST_DEVICE uint32_t encode(float y, float inv_step, float shift,
                                   float edge, float top) const {
    return relu_code(y, inv_step, shift, edge, top);
  }

  // The decoded y (the bin centre, kept >= 0) where the mask is on, else 0.
  BLPA_HOST_DEVICE float decode(uint32_t code, float step, float shift,
                                float edge) const {
    const float centre = bin_centre(code, step, shift);
    return code_positive(code, edge) ? (centre < 0.0f ? 0.0f : centre) : 0.0f;
  }

  BLPA_HOST_DEVICE float backward(float g, uint32_t code, float /*step*/,
                                  float /*shift*/, float edge) const {
    return code_positive(code, edge) ? g : 0.0f;
  }
};

// ---------------------------------------------------------------------------
// The other activations of keras_blpa.blocks.Activation. Each mirrors
// reference.py (encode_codes, activation_forward, _decoded_output,
// _derivative) operation by operation, with TensorFlow's rounding: the codes
// and the piecewise-linear values bit for bit; the smooth forward values to
// the few ulp by which libm's (or CUDA's) expf / erfcf / tanhf differ from
// Eigen's. Outside ReLU the backward multiplies g by f' (as the reference
// does: g * 0 is -0 for negative g, NaN for g = inf); every one decodes y as
// decoded_y (the bin centre kept on its mask's side of 0) and reads the mask
// y > 0 from the code (code >= mask_edge), like the reference.

// tf.round: to the nearest integer, halves to even (rint under the default
// rounding mode on the host; rintf on the device).
BLPA_HOST_DEVICE float round_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::rint(v);
#endif
}

// tf.nn.relu / tf.maximum(y, 0) with NaN propagation: NaN and -0 pass through.
BLPA_HOST_DEVICE float relu_value(float y) { return y < 0.0f ? 0.0f : y; }

// tf.nn.relu6: max then min, NaN propagating (-0 passes through).
BLPA_HOST_DEVICE float relu6_value(float y) {
  const float r = relu_value(y);
  return r > 6.0f ? 6.0f : r;
}

// leaky_relu (TF's LeakyRelu kernel: y > 0 ? y : y * slope, for any slope),
// and linear as slope 1 (y * 1 == y for every float, NaN and -0 included).
struct LeakyRelu {
  float slope;

  BLPA_HOST_DEVICE float forward(float y) const {
    return y > 0.0f ? y : mul_rn(y, slope);
  }

  BLPA_HOST_DEVICE uint32_t encode(float y, float inv_step, float shift,
                                   float edge, float top) const {
    return relu_code(y, inv_step, shift, edge, top);
  }

  BLPA_HOST_DEVICE float decode(uint32_t code, float step, float shift,
                                float edge) const {
    return forward(decoded_y(code, step, shift, edge));
  }

  BLPA_HOST_DEVICE float backward(float g, uint32_t code, float /*step*/,
                                  float /*shift*/, float edge) const {
    return mul_rn(g, code_positive(code, edge) ? 1.0f : slope);
  }
};

// relu6: 0 and 6 both on bin edges; codes >= upper are exactly y >= 6, with
// upper = min(shift + round(6 * (1 / step)), top) (encode: inv_step for
// 1 / step, as the reference's _relu6_upper). `top` = 2^K - 1 of the call.
// relu6's channel_params keep shift in [1, top - 1], so its mask edge is
// shift; the code uses the edge all the same, like the reference.
struct Relu6 {
  float top;

  BLPA_HOST_DEVICE float upper(float shift, float inverse_step) const {
    const float u = add_rn(shift, round_even(mul_rn(6.0f, inverse_step)));
    return u > top ? top : u;
  }

  BLPA_HOST_DEVICE float forward(float y) const { return relu6_value(y); }

  BLPA_HOST_DEVICE uint32_t encode(float y, float inv_step, float shift,
                                   float edge, float top_code) const {
    const float t = relu_split(y, inv_step, shift, edge);
    return code_of(split_at_edge(t, y >= 6.0f, upper(shift, inv_step)),
                   top_code);
  }

  BLPA_HOST_DEVICE float decode(uint32_t code, float step, float shift,
                                float edge) const {
    const float c = static_cast<float>(static_cast<int32_t>(code));
    const float up = upper(shift, div_rn(1.0f, step));
    return c >= up ? 6.0f : relu_value(decoded_y(code, step, shift, edge));
  }

  BLPA_HOST_DEVICE float backward(float g, uint32_t code, float step,
                                  float shift, float edge) const {
    const float c = static_cast<float>(static_cast<int32_t>(code));
    const float up = upper(shift, div_rn(1.0f, step));
    const bool on = code_positive(code, edge) & (c < up);
    return mul_rn(g, on ? 1.0f : 0.0f);
  }
};

// The value functions of the smooth activations, as TensorFlow composes them.
struct SiluFn {
  // tf.nn.silu: y * sigmoid(y); sigmoid as Eigen's scalar logistic,
  // e / (1 + e) with e = exp(min(y, 16.6355324)) (exactly 1 above).
  static BLPA_HOST_DEVICE float f(float y) {
    const float hi = 16.6355324f;
#if defined(__CUDA_ARCH__)
    const float e = expf(y > hi ? hi : y);
#else
    const float e = std::exp(y > hi ? hi : y);
#endif
    return mul_rn(y, div_rn(e, add_rn(1.0f, e)));
  }
};

struct GeluFn {
  // tf.nn.gelu(approximate=False): 0.5 * y * erfc(-y * 0.70710677).
  static BLPA_HOST_DEVICE float f(float y) {
#if defined(__CUDA_ARCH__)
    const float e = erfcf(mul_rn(-y, 0.70710677f));
#else
    const float e = std::erfc(mul_rn(-y, 0.70710677f));
#endif
    return mul_rn(mul_rn(0.5f, y), e);
  }
};

struct GeluTanhFn {
  // tf.nn.gelu(approximate=True):
  // 0.5 * y * (1 + tanh(0.7978846 * (y + 0.044715 * pow(y, 3)))).
  static BLPA_HOST_DEVICE float f(float y) {
#if defined(__CUDA_ARCH__)
    const float cube = powf(y, 3.0f);
#else
    const float cube = std::pow(y, 3.0f);
#endif
    const float inner =
        mul_rn(0.7978845608028654f, add_rn(y, mul_rn(0.044715f, cube)));
    // Eigen's tanh is exactly +-1 beyond +-7.90738964 (its clamp): so here.
    const float c = 7.90738964f;
    const float in = inner > c ? c : (inner < -c ? -c : inner);
#if defined(__CUDA_ARCH__)
    const float th = tanhf(in);
#else
    const float th = std::tanh(in);
#endif
    const float t = inner > c ? 1.0f : (inner < -c ? -1.0f : th);
    return mul_rn(mul_rn(0.5f, y), add_rn(1.0f, t));
  }
};

struct HardSiluFn {
  // y * (relu6(y + 3) / 6), as the reference writes it: bit for bit.
  static BLPA_HOST_DEVICE float f(float y) {
    return mul_rn(y, div_rn(relu6_value(add_rn(y, 3.0f)), 6.0f));
  }
};

// A smooth activation: the ReLU code; decoded output f(decoded_y), the bin
// centre kept on its mask's side of 0; backward
// g * the secant slope (f(hi) - f(lo)) / step across the code's bin,
// lo = (code - shift) * step, hi = (code + (1 - shift)) * step, with the
// asymptotic slopes 0 at code 0 and 1 at code top (= 2^K - 1 of the call).
// Both depend on (channel, code) only, so the CPU kernels of silu and gelu
// read them from per-call tables (`decoded`, `slope`: blpa_cpu.h,
// SmoothTables, filled by table_row with these very formulas) instead of
// calling F::f per element; without tables (hard_silu, the CUDA kernels, the
// standalone test's plain loop) the per-element members below run.
template <typename F>
struct Smooth {
  float top;
  const float* decoded = nullptr;
  const float* slope = nullptr;

  BLPA_HOST_DEVICE float forward(float y) const { return F::f(y); }

  BLPA_HOST_DEVICE uint32_t encode(float y, float inv_step, float shift,
                                   float edge, float top_code) const {
    return relu_code(y, inv_step, shift, edge, top_code);
  }

  BLPA_HOST_DEVICE float decode(uint32_t code, float step, float shift,
                                float edge) const {
    return F::f(decoded_y(code, step, shift, edge));
  }

  // The slope depends on the code alone (no mask): `edge` is unused.
  BLPA_HOST_DEVICE float backward(float g, uint32_t code, float step,
                                  float shift, float /*edge*/) const {
    const float c = static_cast<float>(static_cast<int32_t>(code));
    const float lo = mul_rn(sub_rn(c, shift), step);
    const float hi = mul_rn(add_rn(c, sub_rn(1.0f, shift)), step);
    const float secant = div_rn(sub_rn(F::f(hi), F::f(lo)), step);
    return mul_rn(g, end_slope(c, secant));
  }

  BLPA_HOST_DEVICE float end_slope(float c, float secant) const {
    return c <= 0.0f ? 0.0f : (c >= top ? 1.0f : secant);
  }

  // One channel's table rows (host only; either may be null): value[k] =
  // decode(k, step, shift, mask_edge(shift, top)) and slope[k] = the factor
  // backward multiplies g by, for every code k <= top, bit for bit. f is
  // evaluated once per bin edge where hi of code k - 1 is the same float as
  // lo of code k (for the integer shifts of channel_params, except where
  // |k - shift| passes 2^24: compared by bits, so always exact).
  void table_row(float step, float shift, float* value, float* slope_row) const {
    const int levels = static_cast<int>(top) + 1;
    const float edge = mask_edge(shift, top);
    uint32_t prev_bits = 0;
    bool have_prev = false;
    float prev_f = 0.0f;
    for (int k = 0; k < levels; ++k) {
      const uint32_t code = static_cast<uint32_t>(k);
      if (value != nullptr) value[k] = decode(code, step, shift, edge);
      if (slope_row == nullptr) continue;
      const float c = static_cast<float>(k);
      float secant = 0.0f;
      if (c > 0.0f && c < top) {
        const float lo = mul_rn(sub_rn(c, shift), step);
        const float hi = mul_rn(add_rn(c, sub_rn(1.0f, shift)), step);
        uint32_t lo_bits;
        std::memcpy(&lo_bits, &lo, sizeof(lo_bits));
        const float f_lo = have_prev && prev_bits == lo_bits ? prev_f : F::f(lo);
        const float f_hi = F::f(hi);
        std::memcpy(&prev_bits, &hi, sizeof(prev_bits));
        prev_f = f_hi;
        have_prev = true;
        secant = div_rn(sub_rn(f_hi, f_lo), step);
      }
      slope_row[k] = end_slope(c, secant);
    }
  }
};

using Silu = Smooth<SiluFn>;
using Gelu = Smooth<GeluFn>;
using GeluTanh = Smooth<GeluTanhFn>;
using HardSilu = Smooth<HardSiluFn>;

// The activations by name (keras_blpa.blocks.ACTIVATIONS), for the ops'
// `activation` attr.
enum class ActivationKind {
  kRelu,
  kRelu6,
  kLeakyRelu,
  kLinear,
  kSilu,
  kGelu,
  kGeluApproximate,
  kHardSilu,
};

// The kind called `name`; false if none is.
inline bool activation_kind(const char* name, ActivationKind* kind) {
  static const struct {
    const char* name;
    ActivationKind kind;
  } table[] = {{"relu", ActivationKind::kRelu},
               {"relu6", ActivationKind::kRelu6},
               {"leaky_relu", ActivationKind::kLeakyRelu},
               {"linear", ActivationKind::kLinear},
               {"silu", ActivationKind::kSilu},
               {"gelu", ActivationKind::kGelu},
               {"gelu_approximate", ActivationKind::kGeluApproximate},
               {"hard_silu", ActivationKind::kHardSilu}};
  for (const auto& e : table) {
    const char* a = e.name;
    const char* b = name;
    while (*a != '\0' && *a == *b) ++a, ++b;
    if (*a == '\0' && *b == '\0') {
      *kind = e.kind;
      return true;
    }
  }
  return false;
}

// The names activation_kind accepts, for error messages.
inline const char* activation_names() {
  return "relu, relu6, leaky_relu, linear, silu, gelu, gelu_approximate, "
         "hard_silu";
}

// Calls fn(act) with the activation object of `kind` for K-bit codes
// (negative_slope: leaky_relu's; linear is LeakyRelu{1}). One switch per call,
// each case its own template instantiation of fn.
template <typename Fn>
void with_activation(ActivationKind kind, float negative_slope, int bits,
                     Fn&& fn) {
  const float top = static_cast<float>((1 << bits) - 1);
  switch (kind) {
    case ActivationKind::kRelu: return fn(Relu{});
    case ActivationKind::kRelu6: return fn(Relu6{top});
    case ActivationKind::kLeakyRelu: return fn(LeakyRelu{negative_slope});
    case ActivationKind::kLinear: return fn(LeakyRelu{1.0f});
    case ActivationKind::kSilu: return fn(Silu{top});
    case ActivationKind::kGelu: return fn(Gelu{top});
    case ActivationKind::kGeluApproximate: return fn(GeluTanh{top});
    case ActivationKind::kHardSilu: return fn(HardSilu{top});
  }
}

}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
