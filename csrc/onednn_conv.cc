// XLA FFI handlers running 2-D f32 convolutions (NHWC input/output, HWIO kernel) through oneDNN:
// the forward, the input gradient and the kernel gradient. flaxnets/xla_cpu/onednn.py registers
// them as CPU custom-call targets and calls them inside jitted programs.
//
// Every handler takes two operands and one result plus the attributes strides, pad_lo, pad_hi and
// dilation (2 values each, JAX's convention: dilation 1 = none) and layout (0: oneDNN works on the
// NHWC/HWIO buffers as they are; 1: it picks its own blocked formats for everything, reordered in
// and out around each call; 2: NHWC activations, its own blocked kernel format, the kernel
// reordered per call; the measurements are in flaxnets/xla_cpu/onednn.py). Primitives are created
// once per shape and cached; the scratchpad is the caller's (thread-local), so one primitive can
// run on several XLA threads at once.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Conv {
  dnnl::primitive prim;
  memory::desc a_md, b_md, out_md;        // the operands/result as oneDNN reads/writes them
  memory::desc a_user, b_user, out_user;  // the same in NHWC / HWIO
  size_t scratch_bytes = 0;
  int a_arg, b_arg, out_arg;
};

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<Conv>>& Cache() {
  static auto* cache = new std::map<std::vector<int64_t>, std::shared_ptr<Conv>>();
  return *cache;
}

std::shared_ptr<Conv> Build(Kind kind, const memory::dims& x, const memory::dims& w,
                            const memory::dims& y, const memory::dims& strides,
                            const memory::dims& dil, const memory::dims& lo,
                            const memory::dims& hi, int64_t layout) {
  auto& eng = Engine();
  memory::desc x_user(x, memory::data_type::f32, tag::nhwc);
  memory::desc w_user(w, memory::data_type::f32, tag::hwio);
  memory::desc y_user(y, memory::data_type::f32, tag::nhwc);
  memory::desc x_md = layout == 1 ? memory::desc(x, memory::data_type::f32, tag::any) : x_user;
  memory::desc w_md = layout >= 1 ? memory::desc(w, memory::data_type::f32, tag::any) : w_user;
  memory::desc y_md = layout == 1 ? memory::desc(y, memory::data_type::f32, tag::any) : y_user;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto c = std::make_shared<Conv>();
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x_md, w_md,
      y_md, strides, dil, lo, hi, attr);
  if (kind == kFwd) {
    c->prim = dnnl::convolution_forward(fwd);
    c->a_md = fwd.src_desc(); c->b_md = fwd.weights_desc(); c->out_md = fwd.dst_desc();
    c->a_user = x_user; c->b_user = w_user; c->out_user = y_user;
    c->a_arg = DNNL_ARG_SRC; c->b_arg = DNNL_ARG_WEIGHTS; c->out_arg = DNNL_ARG_DST;
    c->scratch_bytes = fwd.scratchpad_desc().get_size();
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, x_md, w_md, y_md, strides, dil, lo, hi, fwd, attr);
    c->prim = dnnl::convolution_backward_data(bwd);
    c->a_md = bwd.diff_dst_desc(); c->b_md = bwd.weights_desc(); c->out_md = bwd.diff_src_desc();
    c->a_user = y_user; c->b_user = w_user; c->out_user = x_user;
    c->a_arg = DNNL_ARG_DIFF_DST; c->b_arg = DNNL_ARG_WEIGHTS; c->out_arg = DNNL_ARG_DIFF_SRC;
    c->scratch_bytes = bwd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, x_md, w_md, y_md, strides, dil, lo, hi, fwd, attr);
    c->prim = dnnl::convolution_backward_weights(bwd);
    c->a_md = bwd.src_desc(); c->b_md = bwd.diff_dst_desc(); c->out_md = bwd.diff_weights_desc();
    c->a_user = x_user; c->b_user = y_user; c->out_user = w_user;
    c->a_arg = DNNL_ARG_SRC; c->b_arg = DNNL_ARG_DIFF_DST; c->out_arg = DNNL_ARG_DIFF_WEIGHTS;
    c->scratch_bytes = bwd.scratchpad_desc().get_size();
  }
  return c;
}

// A thread's scratch buffers: index 0 the primitive's scratchpad, 1-3 reordered operands/result.
void* Scratch(int i, size_t bytes) {
  thread_local std::vector<std::vector<uint8_t>> bufs(4);
  if (bufs[i].size() < bytes) bufs[i].resize(bytes);
  return bufs[i].data();
}

ffi::Error Run(Kind kind, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
               ffi::Span<const int64_t> pad_hi, ffi::Span<const int64_t> dilation, int64_t layout) {
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || out->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("onednn_conv: float32 only");
  if (strides.size() != 2 || pad_lo.size() != 2 || pad_hi.size() != 2 || dilation.size() != 2)
    return ffi::Error::InvalidArgument("onednn_conv: 2-D convolutions only");
  auto da = a.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (da.size() != 4 || db.size() != 4 || dout.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: rank-4 operands expected");
  // NHWC / HWIO shapes of x, w, y, whichever operand holds them
  const auto& xs = kind == kBwdData ? dout : da;
  const auto& ws = kind == kFwd ? db : (kind == kBwdData ? db : dout);
  const auto& ys = kind == kFwd ? dout : (kind == kBwdData ? da : db);
  memory::dims x{xs[0], xs[3], xs[1], xs[2]}, w{ws[3], ws[2], ws[0], ws[1]}, y{ys[0], ys[3], ys[1], ys[2]};
  memory::dims st{strides[0], strides[1]}, dil{dilation[0] - 1, dilation[1] - 1};
  memory::dims lo{pad_lo[0], pad_lo[1]}, hi{pad_hi[0], pad_hi[1]};
  std::vector<int64_t> key{kind, layout};
  for (const auto* d : {&x, &w, &y, &st, &dil, &lo, &hi}) key.insert(key.end(), d->begin(), d->end());
  std::shared_ptr<Conv> c;
  try {
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = Cache().find(key);
      if (it != Cache().end()) c = it->second;
    }
    if (!c) {
      c = Build(kind, x, w, y, st, dil, lo, hi, layout);
      std::lock_guard<std::mutex> lock(cache_mutex);
      Cache().emplace(key, c);
    }
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory a_mem(c->a_user, eng, a.untyped_data()), b_mem(c->b_user, eng, b.untyped_data());
    memory out_mem(c->out_user, eng, out->untyped_data());
    memory a_in = a_mem, b_in = b_mem, out_in = out_mem;
    if (c->a_md != c->a_user) {
      a_in = memory(c->a_md, eng, Scratch(1, c->a_md.get_size()));
      dnnl::reorder(a_mem, a_in).execute(stream, a_mem, a_in);
    }
    if (c->b_md != c->b_user) {
      b_in = memory(c->b_md, eng, Scratch(2, c->b_md.get_size()));
      dnnl::reorder(b_mem, b_in).execute(stream, b_mem, b_in);
    }
    if (c->out_md != c->out_user) out_in = memory(c->out_md, eng, Scratch(3, c->out_md.get_size()));
    memory scratch(memory::desc({static_cast<int64_t>(c->scratch_bytes)}, memory::data_type::u8, tag::x),
                   eng, Scratch(0, c->scratch_bytes));
    c->prim.execute(stream, {{c->a_arg, a_in}, {c->b_arg, b_in}, {c->out_arg, out_in},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    if (c->out_md != c->out_user) dnnl::reorder(out_in, out_mem).execute(stream, out_in, out_mem);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define ONEDNN_CONV_BINDING                                                          \
  ffi::Ffi::Bind()                                                                   \
      .Arg<ffi::AnyBuffer>()                                                         \
      .Arg<ffi::AnyBuffer>()                                                         \
      .Ret<ffi::AnyBuffer>()                                                         \
      .Attr<ffi::Span<const int64_t>>("strides")                                     \
      .Attr<ffi::Span<const int64_t>>("pad_lo")                                      \
      .Attr<ffi::Span<const int64_t>>("pad_hi")                                      \
      .Attr<ffi::Span<const int64_t>>("dilation")                                    \
      .Attr<int64_t>("layout")

ffi::Error Fwd(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
               ffi::Span<const int64_t> s, ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
               ffi::Span<const int64_t> d, int64_t layout) {
  return Run(kFwd, a, b, out, s, lo, hi, d, layout);
}
ffi::Error BwdData(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Span<const int64_t> s, ffi::Span<const int64_t> lo,
                   ffi::Span<const int64_t> hi, ffi::Span<const int64_t> d, int64_t layout) {
  return Run(kBwdData, a, b, out, s, lo, hi, d, layout);
}
ffi::Error BwdWeights(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Span<const int64_t> s, ffi::Span<const int64_t> lo,
                      ffi::Span<const int64_t> hi, ffi::Span<const int64_t> d, int64_t layout) {
  return Run(kBwdWeights, a, b, out, s, lo, hi, d, layout);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvFwd, Fwd, ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdData, BwdData, ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBwdWeights, BwdWeights, ONEDNN_CONV_BINDING);

// The oneDNN version linked, major*10000 + minor*100 + patch (the Python side reports it).
extern "C" int64_t OnednnConvVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
