// keras_blpa: TensorFlow ops of the fused BLPA block kernels.
//
// Thin OpKernels around cc/blpa_cpu.h (CPU, sharded over TensorFlow's intra-op
// thread pool) and cc/blpa_quant_cuda.h (GPU, launched on the op's raw CUDA
// stream; compiled in when GOOGLE_CUDA is defined). KERAS_BLPA_CPU_ISA=avx|avx2
// caps the instruction-set level of the CPU kernels (default: the best the CPU
// supports; every level gives the same bits). The semantics, argument
// order and packing layout are those of
// keras_blpa/backends/tensorflow/reference.py:
//
//   Blpa>BnActEncode       (x, scale, offset, inv_step, shift)        -> (f(y), packed)
//   Blpa>DecodeActivation  (packed, shape, step, shift)               -> decoded f output
//   Blpa>BnGradReduce      (packed, grad_a, step, shift, gamma, beta) -> (sum_g, sum_gx)
//   Blpa>BnGradInput       (packed, grad_a, step, shift, gamma, beta,
//                           coef, mean_g, mean_gx)                    -> grad_x
//
// All float tensors are float32, channels last (channel = flat index % C where
// C is the last dimension); every per-channel vector has C elements; `packed`
// is a 1-D uint8 tensor of ceil(n * bits / 8) bytes; `bits` is 2, 4 or 8.
// Every op has the attrs `activation` (a name of keras_blpa.blocks.ACTIVATIONS,
// default "relu") and `negative_slope` (leaky_relu's slope, default 0; ignored
// by the others), turned once per call into the struct of
// cc/blpa_activations.h that the kernels are instantiated with.
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <type_traits>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/tensor_util.h"
#include "tensorflow/core/platform/threadpool.h"

#include "cc/blpa_activations.h"
#include "cc/blpa_bins.h"
#include "cc/blpa_cpu.h"

#if GOOGLE_CUDA
#include "xla/stream_executor/stream.h"
#include "cc/blpa_quant_cuda.h"
#endif

namespace keras_blpa {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// ---------------------------------------------------------------------------
// Shape functions.

absl::Status ActivationAttr(const std::string& name,
                            blpa::ActivationKind* kind) {
  if (!blpa::activation_kind(name.c_str(), kind)) {
    return errors::InvalidArgument("activation must be one of ",
                                   blpa::activation_names(), ", got '", name,
                                   "'");
  }
  return absl::OkStatus();
}

// Validates the attrs (bits and activation) every op has.
absl::Status BitsAttr(InferenceContext* c, int* bits) {
  TF_RETURN_IF_ERROR(c->GetAttr("bits", bits));
  if (!blpa::valid_bits(*bits)) {
    return errors::InvalidArgument("bits must be 2, 4 or 8, got ", *bits);
  }
  std::string name;
  TF_RETURN_IF_ERROR(c->GetAttr("activation", &name));
  blpa::ActivationKind kind;
  return ActivationAttr(name, &kind);
}

// Merges the vector inputs [first, last) into one [C] shape with the last
// dimension of `data` (unknown rank allowed).
absl::Status ChannelVectors(InferenceContext* c, ShapeHandle data, int first,
                            int last, DimensionHandle* channels) {
  *channels = c->UnknownDim();
  if (c->RankKnown(data)) {
    if (c->Rank(data) < 1) {
      return errors::InvalidArgument(
          "the data tensor must have rank >= 1 (channels last), got a scalar");
    }
    *channels = c->Dim(data, -1);
  }
  for (int i = first; i < last; ++i) {
    ShapeHandle v;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &v));
    TF_RETURN_IF_ERROR(c->Merge(*channels, c->Dim(v, 0), channels));
  }
  return absl::OkStatus();
}

absl::Status PackedInput(InferenceContext* c, int index, ShapeHandle data,
                         int bits) {
  ShapeHandle packed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 1, &packed));
  if (c->FullyDefined(data)) {
    const int64_t n = c->Value(c->NumElements(data));
    DimensionHandle unused;
    TF_RETURN_IF_ERROR(c->WithValue(c->Dim(packed, 0),
                                    blpa::packed_size(n, bits), &unused));
  }
  return absl::OkStatus();
}

absl::Status EncodeShape(InferenceContext* c) {
  int bits;
  TF_RETURN_IF_ERROR(BitsAttr(c, &bits));
  ShapeHandle x = c->input(0);
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 1, &x));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelVectors(c, x, 1, 5, &channels));
  c->set_output(0, x);
  if (c->FullyDefined(x)) {
    const int64_t n = c->Value(c->NumElements(x));
    c->set_output(1, c->Vector(blpa::packed_size(n, bits)));
  } else {
    c->set_output(1, c->Vector(c->UnknownDim()));
  }
  return absl::OkStatus();
}

absl::Status DecodeShape(InferenceContext* c) {
  int bits;
  TF_RETURN_IF_ERROR(BitsAttr(c, &bits));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(1, &out));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(out, 1, &out));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelVectors(c, out, 2, 4, &channels));
  TF_RETURN_IF_ERROR(PackedInput(c, 0, out, bits));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status GradReduceShape(InferenceContext* c) {
  int bits;
  TF_RETURN_IF_ERROR(BitsAttr(c, &bits));
  ShapeHandle g;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 1, &g));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelVectors(c, g, 2, 6, &channels));
  TF_RETURN_IF_ERROR(PackedInput(c, 0, g, bits));
  c->set_output(0, c->Vector(channels));
  c->set_output(1, c->Vector(channels));
  return absl::OkStatus();
}

absl::Status GradInputShape(InferenceContext* c) {
  int bits;
  TF_RETURN_IF_ERROR(BitsAttr(c, &bits));
  ShapeHandle g;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 1, &g));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelVectors(c, g, 2, 9, &channels));
  TF_RETURN_IF_ERROR(PackedInput(c, 0, g, bits));
  c->set_output(0, g);
  return absl::OkStatus();
}

REGISTER_OP("Blpa>BnActEncode")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("inv_step: float")
    .Input("shift: float")
    .Output("output: float")
    .Output("packed: uint8")
    .Attr("bits: int")
    .Attr("activation: string = 'relu'")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn(EncodeShape)
    .Doc(R"doc(
BN -> activation forward with the K-bit code of the BN output:
y = x * scale + offset; returns activation(y) and the packed codes of y.
)doc");

REGISTER_OP("Blpa>DecodeActivation")
    .Input("packed: uint8")
    .Input("shape: Tshape")
    .Input("step: float")
    .Input("shift: float")
    .Output("output: float")
    .Attr("bits: int")
    .Attr("activation: string = 'relu'")
    .Attr("negative_slope: float = 0.0")
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .SetShapeFn(DecodeShape)
    .Doc(R"doc(
The activation output of the given shape decoded from the codes (ReLU: bin
centre where the code's mask is on, else 0).
)doc");

REGISTER_OP("Blpa>BnGradReduce")
    .Input("packed: uint8")
    .Input("grad_a: float")
    .Input("step: float")
    .Input("shift: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("sum_g: float")
    .Output("sum_gx: float")
    .Attr("bits: int")
    .Attr("activation: string = 'relu'")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn(GradReduceShape)
    .Doc(R"doc(
Per-channel sums of g and g * x_hat with g = grad_a * f', f' as read back
from the codes (the ReLU mask, or the activation's slope), for the BN backward.
)doc");

REGISTER_OP("Blpa>BnGradInput")
    .Input("packed: uint8")
    .Input("grad_a: float")
    .Input("step: float")
    .Input("shift: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("coef: float")
    .Input("mean_g: float")
    .Input("mean_gx: float")
    .Output("grad_x: float")
    .Attr("bits: int")
    .Attr("activation: string = 'relu'")
    .Attr("negative_slope: float = 0.0")
    .SetShapeFn(GradInputShape)
    .Doc(R"doc(
BN input gradient coef * (g - mean_g - x_hat * mean_gx) from the codes.
)doc");

// ---------------------------------------------------------------------------
// Validation shared by the CPU and GPU kernels.

struct CpuTag {};
struct GpuTag {};

// Reads and validates the attrs of every op: bits and the activation.
class BitsKernel : public OpKernel {
 public:
  explicit BitsKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bits", &bits_));
    OP_REQUIRES(ctx, blpa::valid_bits(bits_),
                errors::InvalidArgument("bits must be 2, 4 or 8, got ", bits_));
    std::string name;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &name));
    OP_REQUIRES_OK(ctx, ActivationAttr(name, &kind_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("negative_slope", &negative_slope_));
  }

 protected:
  // Calls fn(act) with the activation struct of the attrs (one switch per call).
  template <typename Fn>
  void WithActivation(Fn&& fn) const {
    blpa::with_activation(kind_, negative_slope_, bits_, fn);
  }

  int bits_;
  blpa::ActivationKind kind_;
  float negative_slope_;
};

// Checks that the data tensor has rank >= 1 and returns C (its last dim).
bool DataChannels(OpKernelContext* ctx, const Tensor& t, const char* name,
                  int64_t* channels) {
  if (t.dims() < 1) {
    ctx->CtxFailure(errors::InvalidArgument(
        name, " must have rank >= 1 (channels last), got shape ",
        t.shape().DebugString()));
    return false;
  }
  *channels = t.dim_size(t.dims() - 1);
  return true;
}

bool ChannelVector(OpKernelContext* ctx, int index, const char* name,
                   int64_t channels) {
  const Tensor& v = ctx->input(index);
  if (!TensorShapeUtils::IsVector(v.shape()) || v.dim_size(0) != channels) {
    ctx->CtxFailure(errors::InvalidArgument(
        name, " must be a vector of ", channels,
        " floats (one per channel, the last dimension of the data), got shape ",
        v.shape().DebugString()));
    return false;
  }
  return true;
}

bool PackedMatches(OpKernelContext* ctx, const Tensor& packed, int64_t n,
                   int bits) {
  const int64_t want = blpa::packed_size(n, bits);
  if (!TensorShapeUtils::IsVector(packed.shape()) ||
      packed.dim_size(0) != want) {
    ctx->CtxFailure(errors::InvalidArgument(
        "packed must be a 1-D uint8 tensor of ceil(n * bits / 8) = ", want,
        " bytes for n = ", n, " elements and bits = ", bits,
        ", got shape ", packed.shape().DebugString()));
    return false;
  }
  return true;
}

const float* Vec(OpKernelContext* ctx, int index) {
  return ctx->input(index).flat<float>().data();
}

// Cost of one packed byte for the thread pool's shard sizing, in cycles.
int64_t ByteCost(int bits) { return 8 / bits * 12; }

void ParallelBytes(OpKernelContext* ctx, int64_t nbytes, int64_t cost,
                   const std::function<void(int64_t, int64_t)>& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      nbytes, cost, fn);
}

// parallel_for over the channels for building the tables of a smooth
// activation (blpa::cpu::SmoothTables): a few libm calls per code.
auto ChannelsFor(OpKernelContext* ctx, int bits) {
  const int64_t cost = (int64_t{1} << bits) * 200;
  return [ctx, cost](int64_t channels, auto fn) {
    ParallelBytes(ctx, channels, cost, fn);
  };
}

// Instruction-set level of the CPU kernels, read once.
blpa::cpu::CpuLevel CpuIsa() {
  static const blpa::cpu::CpuLevel level =
      blpa::cpu::usable_cpu_level(std::getenv("KERAS_BLPA_CPU_ISA"));
  return level;
}

#if GOOGLE_CUDA
cudaStream_t RawStream(OpKernelContext* ctx) {
  return reinterpret_cast<cudaStream_t>(
      ctx->op_device_context()->stream()->platform_specific_handle().stream);
}

void CheckLaunch(OpKernelContext* ctx, int err, const char* what) {
  OP_REQUIRES(ctx, err == 0,
              errors::Internal(what, " CUDA launch failed: ",
                               blpa::cuda::error_string(err)));
}
#endif

// ---------------------------------------------------------------------------
// Kernels.

template <typename Device>
class BnActEncodeOp : public BitsKernel {
 public:
  using BitsKernel::BitsKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    int64_t C;
    if (!DataChannels(ctx, x, "x", &C)) return;
    static const char* names[] = {"scale", "offset", "inv_step", "shift"};
    for (int i = 1; i < 5; ++i) {
      if (!ChannelVector(ctx, i, names[i - 1], C)) return;
    }
    const int64_t n = x.NumElements();
    const int64_t nbytes = blpa::packed_size(n, bits_);
    Tensor* act_out = nullptr;
    Tensor* packed = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &act_out));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(1, TensorShape({nbytes}), &packed));
    if (n == 0) return;
    blpa::EncodeArgs a;
    a.x = x.flat<float>().data();
    a.scale = Vec(ctx, 1);
    a.offset = Vec(ctx, 2);
    a.inv_step = Vec(ctx, 3);
    a.shift = Vec(ctx, 4);
    a.n = n;
    a.C = C;
    a.bits = bits_;
    a.activation = act_out->flat<float>().data();
    a.packed = packed->flat<uint8_t>().data();
    WithActivation([&](auto act) {
      if constexpr (std::is_same<Device, CpuTag>::value) {
        ParallelBytes(ctx, nbytes, ByteCost(bits_),
                      [&a, act](int64_t b, int64_t e) {
                        blpa::cpu::bn_encode(act, a, b, e, CpuIsa());
                      });
      } else {
#if GOOGLE_CUDA
        CheckLaunch(ctx, blpa::cuda::bn_encode(act, a, RawStream(ctx)),
                    "Blpa>BnActEncode");
#endif
      }
    });
  }
};

template <typename Device>
class DecodeActivationOp : public BitsKernel {
 public:
  using BitsKernel::BitsKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& packed = ctx->input(0);
    const Tensor& shape_t = ctx->input(1);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(shape_t.shape()),
                errors::InvalidArgument("shape must be a 1-D tensor, got shape ",
                                        shape_t.shape().DebugString()));
    TensorShape shape;
    OP_REQUIRES_OK(ctx, ::tensorflow::tensor::MakeShape(shape_t, &shape));
    OP_REQUIRES(ctx, shape.dims() >= 1,
                errors::InvalidArgument(
                    "shape must have at least one dimension (channels last)"));
    const int64_t C = shape.dim_size(shape.dims() - 1);
    if (!ChannelVector(ctx, 2, "step", C)) return;
    if (!ChannelVector(ctx, 3, "shift", C)) return;
    const int64_t n = shape.num_elements();
    if (!PackedMatches(ctx, packed, n, bits_)) return;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    if (n == 0) return;
    blpa::DecodeArgs a;
    a.packed = packed.flat<uint8_t>().data();
    a.step = Vec(ctx, 2);
    a.shift = Vec(ctx, 3);
    a.n = n;
    a.C = C;
    a.bits = bits_;
    a.out = out->flat<float>().data();
    WithActivation([&](auto act) {
      if constexpr (std::is_same<Device, CpuTag>::value) {
        blpa::cpu::SmoothTables tables;  // smooth activations: f per code
        act = tables.attach(act, blpa::cpu::Table::kDecoded, a.step, a.shift,
                            C, bits_, ChannelsFor(ctx, bits_));
        ParallelBytes(ctx, packed.NumElements(), ByteCost(bits_),
                      [&a, act](int64_t b, int64_t e) {
                        blpa::cpu::decode(act, a, b, e, CpuIsa());
                      });
      } else {
#if GOOGLE_CUDA
        CheckLaunch(ctx, blpa::cuda::decode(act, a, RawStream(ctx)),
                    "Blpa>DecodeActivation");
#endif
      }
    });
  }
};

// Validates (packed, grad_a, step, shift, gamma, beta[, coef, mean_g,
// mean_gx]) and fills the argument struct.
bool GradInputs(OpKernelContext* ctx, int bits, int num_vectors,
                blpa::GradArgs* a) {
  static const char* names[] = {"step", "shift",  "gamma",  "beta",
                                "coef", "mean_g", "mean_gx"};
  const Tensor& packed = ctx->input(0);
  const Tensor& g = ctx->input(1);
  int64_t C;
  if (!DataChannels(ctx, g, "grad_a", &C)) return false;
  for (int i = 0; i < num_vectors; ++i) {
    if (!ChannelVector(ctx, 2 + i, names[i], C)) return false;
  }
  const int64_t n = g.NumElements();
  if (!PackedMatches(ctx, packed, n, bits)) return false;
  a->packed = packed.flat<uint8_t>().data();
  a->grad_a = g.flat<float>().data();
  a->step = Vec(ctx, 2);
  a->shift = Vec(ctx, 3);
  a->gamma = Vec(ctx, 4);
  a->beta = Vec(ctx, 5);
  a->n = n;
  a->C = C;
  a->bits = bits;
  a->coef = a->mean_g = a->mean_gx = nullptr;
  a->grad_x = nullptr;
  if (num_vectors == 7) {
    a->coef = Vec(ctx, 6);
    a->mean_g = Vec(ctx, 7);
    a->mean_gx = Vec(ctx, 8);
  }
  return true;
}

template <typename Device>
class BnGradReduceOp : public BitsKernel {
 public:
  using BitsKernel::BitsKernel;

  void Compute(OpKernelContext* ctx) override {
    blpa::GradArgs a;
    if (!GradInputs(ctx, bits_, 4, &a)) return;
    const int64_t C = a.C;
    Tensor* sum_g = nullptr;
    Tensor* sum_gx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({C}), &sum_g));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({C}), &sum_gx));
    WithActivation([&](auto act) {
      if constexpr (std::is_same<Device, CpuTag>::value) {
        blpa::cpu::SmoothTables tables;  // smooth activations: slope per code
        if (a.n > 0) {
          act = tables.attach(act, blpa::cpu::Table::kSlope, a.step, a.shift,
                              C, bits_, ChannelsFor(ctx, bits_));
        }
        // Fixed blocks, each a fixed partial sum: the same bits however the
        // thread pool schedules them.
        const int64_t block_cost =
            blpa::cpu::kReduceBlockBytes * ByteCost(bits_);
        blpa::cpu::bn_grad_reduce(
            act, a, CpuIsa(), sum_g->flat<float>().data(),
            sum_gx->flat<float>().data(),
            [ctx, block_cost](int64_t blocks, auto fn) {
              ParallelBytes(ctx, blocks, block_cost, fn);
            });
      } else {
#if GOOGLE_CUDA
        CheckLaunch(ctx,
                    blpa::cuda::bn_grad_reduce(act, a,
                                               sum_g->flat<float>().data(),
                                               sum_gx->flat<float>().data(),
                                               RawStream(ctx)),
                    "Blpa>BnGradReduce");
#endif
      }
    });
  }
};

template <typename Device>
class BnGradInputOp : public BitsKernel {
 public:
  using BitsKernel::BitsKernel;

  void Compute(OpKernelContext* ctx) override {
    blpa::GradArgs a;
    if (!GradInputs(ctx, bits_, 7, &a)) return;
    // grad_x is written in place of grad_a where TensorFlow hands over
    // grad_a's buffer (its last reader): the kernels read each element's
    // incoming gradient before writing its result, at the same index.
    // One full-size float tensor fewer at the backward's peak.
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {1}, 0, ctx->input(1).shape(), &dx));
    if (a.n == 0) return;
    a.grad_x = dx->flat<float>().data();
    WithActivation([&](auto act) {
      if constexpr (std::is_same<Device, CpuTag>::value) {
        blpa::cpu::SmoothTables tables;  // smooth activations: slope per code
        act = tables.attach(act, blpa::cpu::Table::kSlope, a.step, a.shift,
                            a.C, bits_, ChannelsFor(ctx, bits_));
        ParallelBytes(ctx, blpa::packed_size(a.n, bits_), ByteCost(bits_) * 2,
                      [&a, act](int64_t b, int64_t e) {
                        blpa::cpu::bn_grad_input(act, a, b, e, CpuIsa());
                      });
      } else {
#if GOOGLE_CUDA
        CheckLaunch(ctx, blpa::cuda::bn_grad_input(act, a, RawStream(ctx)),
                    "Blpa>BnGradInput");
#endif
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("Blpa>BnActEncode").Device(DEVICE_CPU),
                        BnActEncodeOp<CpuTag>);
REGISTER_KERNEL_BUILDER(Name("Blpa>DecodeActivation").Device(DEVICE_CPU),
                        DecodeActivationOp<CpuTag>);
REGISTER_KERNEL_BUILDER(Name("Blpa>BnGradReduce").Device(DEVICE_CPU),
                        BnGradReduceOp<CpuTag>);
REGISTER_KERNEL_BUILDER(Name("Blpa>BnGradInput").Device(DEVICE_CPU),
                        BnGradInputOp<CpuTag>);

#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
REGISTER_KERNEL_BUILDER(Name("Blpa>BnActEncode").Device(DEVICE_GPU),
                        BnActEncodeOp<GpuTag>);
REGISTER_KERNEL_BUILDER(
    Name("Blpa>DecodeActivation").Device(DEVICE_GPU).HostMemory("shape"),
    DecodeActivationOp<GpuTag>);
REGISTER_KERNEL_BUILDER(Name("Blpa>BnGradReduce").Device(DEVICE_GPU),
                        BnGradReduceOp<GpuTag>);
REGISTER_KERNEL_BUILDER(Name("Blpa>BnGradInput").Device(DEVICE_GPU),
                        BnGradInputOp<GpuTag>);
#endif  // GOOGLE_CUDA

// The instruction set the CPU kernels run with, for `python -m keras_blpa.info`.
REGISTER_OP("Blpa>CpuIsa")
    .Output("isa: string")
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape);

class CpuIsaOp : public OpKernel {
 public:
  explicit CpuIsaOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<::tensorflow::tstring>()() =
        blpa::cpu::cpu_level_name(CpuIsa());
  }
};
REGISTER_KERNEL_BUILDER(Name("Blpa>CpuIsa").Device(DEVICE_CPU), CpuIsaOp);

}  // namespace keras_blpa
