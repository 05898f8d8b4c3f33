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
//   uint32_t encode(float y, float inv_step, float shift, float top)
//       the code of y: code_of(rule(bin_of(y, inv_step, shift)), top), the
//       rule putting each breakpoint of f on a bin edge (split_at_edge);
//   float decode(uint32_t code, float step, float shift)
//       the output a rebuilt from the code, for the backward pass;
//   float backward(float g, uint32_t code, float step, float shift)
//       dL/dy from g = dL/da (g arrives loaded: no conditional load), with
//       f'(y) rebuilt from the code.
// The BN part (x_hat from bin_centre) is the same for every activation. A new
// activation is one struct here plus one BLPA_CUDA_ACTIVATION line in
// blpa_quant_cuda.cu (the CPU kernels are instantiated where they are called),
// and its check_cpu / check_gpu calls in blpa_quant_test.cc.
#ifndef KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
#define KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
#include <stdint.h>

#include "cc/blpa_bins.h"

namespace blpa {

// ReLU, the reference behaviour: its breakpoint y = 0 is the edge between
// codes shift - 1 and shift, so the mask code >= shift is exactly y > 0 (for
// 1 <= shift <= top, as the reference clips shift).
struct Relu {
  // Like tf.nn.relu: negative -> 0, while NaN and -0 pass through unchanged.
  BLPA_HOST_DEVICE float forward(float y) const { return y < 0.0f ? 0.0f : y; }

  BLPA_HOST_DEVICE uint32_t encode(float y, float inv_step, float shift,
                                   float top) const {
    return code_of(split_at_edge(bin_of(y, inv_step, shift), y > 0.0f, shift),
                   top);
  }

  // Bin centre where the mask is on, else 0.
  BLPA_HOST_DEVICE float decode(uint32_t code, float step, float shift) const {
    return mask(code, shift) ? bin_centre(code, step, shift) : 0.0f;
  }

  BLPA_HOST_DEVICE float backward(float g, uint32_t code, float /*step*/,
                                  float shift) const {
    return mask(code, shift) ? g : 0.0f;
  }

  static BLPA_HOST_DEVICE bool mask(uint32_t code, float shift) {
    return static_cast<float>(static_cast<int32_t>(code)) >= shift;
  }
};

}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_ACTIVATIONS_H_
