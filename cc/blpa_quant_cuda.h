// keras_blpa: CUDA launchers of the four fused block kernels.
//
// Plain C++ declarations with no CUDA header needed by the caller: the stream
// is the raw cudaStream_t (declared here exactly as CUDA's driver_types.h
// does), so the TensorFlow op (compiled by g++) and the standalone test can
// call into the object nvcc builds from blpa_quant_cuda.cu. Every launcher is
// asynchronous on `stream` and returns a cudaError_t as an int (0 = success);
// blpa_cuda_error_string turns it into text. Argument structs and semantics are
// those of blpa_bins.h (all pointers are device pointers).
#ifndef KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_
#define KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_

#include "cc/blpa_bins.h"

typedef struct CUstream_st* cudaStream_t;

namespace blpa {
namespace cuda {

int bn_relu_encode(const EncodeArgs& args, cudaStream_t stream);
int decode_relu(const DecodeArgs& args, cudaStream_t stream);
// Writes the per-channel float sums (C each; zeroed first by the launcher).
int bn_grad_reduce(const GradArgs& args, float* sum_g, float* sum_gx,
                   cudaStream_t stream);
int bn_grad_input(const GradArgs& args, cudaStream_t stream);

const char* error_string(int error);

}  // namespace cuda
}  // namespace blpa

#endif  // KERAS_BLPA_CC_BLPA_QUANT_CUDA_H_
