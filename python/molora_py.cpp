// molora_py: a small Python module over MoLoRALinear<float> and MoLoRALinear<float, bf16 /
// f16>, for running molora beside PyTorch in one process (tools/bench_peers.py). Weights are
// numpy arrays the module keeps alive and reads in place (no copies); the forward releases
// the GIL. Activations are float32 in every class.
//
//   import molora_py
//   layer = molora_py.MoLoRALinear(in_features, out_features, num_experts, top_k, rank, lora_alpha)
//   layer.wrap_base_weight(w0)          # float32 [out, in], C order: used in place
//   layer16 = molora_py.MoLoRALinearBF16(...)   # or MoLoRALinearF16: the base weight in 16 bits
//   layer16.wrap_base_weight(bits)      # uint16 [out, in] (torch: w.view(torch.int16).numpy()
//                                       # viewed as uint16), used in place
//   layer.set_router(weight, bias)      # [E, in], [E] (bias None without a router bias)
//   layer.set_expert(e, A, B)           # [r, in], [out, r]
//   y = layer.forward(x)                # x float32 [T, in] (or [..., in]); y [T, out]
//   layer.forward(x, out=y)             # into a caller's float32 array, no allocation
//   layer16.set_bf16_dot(True)          # MoLoRALinearBF16 only: the base product rounds x to
//                                       # bf16 and runs AVX512_BF16's dot products (PyTorch's
//                                       # bf16 numerics); layer16.bf16_dot reads it back
//
// Built only when asked for: cmake -DMOLORA_PYTHON=ON (needs Debian's pybind11-dev).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <molora/molora.hpp>

#include <memory>
#include <string>
#include <type_traits>

#if MOLORA_USE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Index = molora::Index;

// Requires a 2-d array of exactly `rows` x `cols`; else a molora::shape_error naming the field.
template <class A>
void require_2d(const A& a, Index rows, Index cols, const char* field) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols)
    throw molora::shape_error(molora::detail::cat(field, ": expected [", rows, ", ", cols, "], got ndim ", a.ndim(),
                                                  a.ndim() >= 1 ? molora::detail::cat(" shape[0] ", a.shape(0)) : "",
                                                  a.ndim() >= 2 ? molora::detail::cat(" shape[1] ", a.shape(1)) : ""));
}

// Rows of an array [..., cols] with its leading dimensions folded together.
Index folded_rows(const py::buffer_info& b, Index cols, const char* field) {
  if (b.ndim < 1 || b.shape[static_cast<std::size_t>(b.ndim - 1)] != cols)
    throw molora::shape_error(molora::detail::cat(field, ": expected a last dimension of ", cols, ", got ndim ", b.ndim,
                                                  b.ndim >= 1 ? molora::detail::cat(" last ", b.shape.back()) : ""));
  Index rows = 1;
  for (std::size_t d = 0; d + 1 < static_cast<std::size_t>(b.ndim); ++d) rows *= static_cast<Index>(b.shape[d]);
  return rows;
}

template <class W>
class PyMoLoRALinear {
 public:
  using Layer = molora::MoLoRALinear<float, W>;
  static constexpr bool kHalf = !std::is_same_v<W, float>;

  PyMoLoRALinear(Index in, Index out, Index experts, Index top_k, Index rank, double alpha, bool router_bias)
      : layer_(make_config(in, out, experts, top_k, rank, alpha, router_bias)) {}

  // float32 [out, in] for a float base; for a 16-bit base, the raw bits as a 2-byte integer
  // array (uint16 or int16) [out, in]. C order in both cases: the layer reads it in place.
  void wrap_base_weight(const py::array& w) {
    if (!(w.flags() & py::array::c_style))
      throw molora::shape_error("base weight: expected a C-ordered array (no copy is made), got another layout");
    require_2d(w, out(), in(), "base weight");
    if constexpr (kHalf) {
      // The buffer protocol's view of the element (numpy 2 moved the descriptor fields that
      // Debian's pybind11 reads directly, so dtype().itemsize() is not trusted here).
      const py::buffer_info b = w.request();
      if (b.itemsize != 2 || (b.format != "H" && b.format != "h"))
        throw molora::shape_error(molora::detail::cat("base weight: expected the 16-bit pattern as uint16/int16, got format '",
                                                      b.format, "' of ", b.itemsize, " bytes"));
      layer_.wrap_base_weight(static_cast<const W*>(w.data()), out(), in());
    } else {
      if (!py::isinstance<py::array_t<float>>(w))
        throw molora::shape_error("base weight: expected float32, got another dtype");
      layer_.wrap_base_weight(typename Layer::BaseWeightMap(static_cast<const float*>(w.data()), out(), in()));
    }
    base_keep_ = w;  // the layer reads the array in place: keep it alive
  }

  void set_router(const Array& w, const py::object& b) {
    require_2d(w, experts(), in(), "router.weight");
    auto& router = layer_.adapter().router();
    router.set_weight(Eigen::Map<const molora::RowMatrix<float>>(w.data(), experts(), in()));
    if (!b.is_none()) {
      const Array bias = b.cast<Array>();
      if (bias.ndim() != 1 || bias.shape(0) != experts())
        throw molora::shape_error(molora::detail::cat("router.bias: expected [", experts(), "], got ndim ", bias.ndim()));
      router.set_bias(Eigen::Map<const Eigen::RowVectorXf>(bias.data(), experts()));
    }
  }

  void set_expert(Index e, const Array& a, const Array& b) {
    const Index r = layer_.adapter().rank();
    require_2d(a, r, in(), "expert lora_A.weight");
    require_2d(b, out(), r, "expert lora_B.weight");
    layer_.adapter().set_expert_A(e, Eigen::Map<const molora::RowMatrix<float>>(a.data(), r, in()));
    layer_.adapter().set_expert_B(e, Eigen::Map<const molora::RowMatrix<float>>(b.data(), out(), r));
  }

  void set_base_strategy(const std::string& s) {
    if (s == "automatic") layer_.set_base_strategy(molora::BaseStrategy::automatic);
    else if (s == "eigen") layer_.set_base_strategy(molora::BaseStrategy::eigen);
    else if (s == "skinny") layer_.set_base_strategy(molora::BaseStrategy::skinny);
    else if (s == "gemm") layer_.set_base_strategy(molora::BaseStrategy::gemm);
    else throw molora::config_error(molora::detail::mismatch("base strategy", "automatic, eigen, skinny or gemm", s));
  }

  // The bf16 base's opt-in bf16-dot mode (MoLoRALinear::set_bf16_dot).
  void set_bf16_dot(bool on) {
    if constexpr (std::is_same_v<W, molora::bf16>) layer_.set_bf16_dot(on);
  }
  bool bf16_dot() const {
    if constexpr (std::is_same_v<W, molora::bf16>) return layer_.bf16_dot();
    return false;
  }

  // y = layer(x) into `out` (allocated when None). x: float32 [..., in], C order.
  py::array forward(const Array& x, py::object out_obj) {
    const py::buffer_info xb = x.request();
    const Index T = folded_rows(xb, in(), "x");
    py::array_t<float> y;
    if (out_obj.is_none()) {
      std::vector<py::ssize_t> shape(xb.shape.begin(), xb.shape.end());
      shape.back() = out();
      y = py::array_t<float>(shape);
    } else {
      y = out_obj.cast<py::array_t<float>>();
      if (!(y.flags() & py::array::c_style) || !y.writeable())
        throw molora::shape_error("out: expected a writeable C-ordered float32 array");
      const py::buffer_info yb = y.request();
      if (folded_rows(yb, out(), "out") != T)
        throw molora::shape_error(molora::detail::cat("out: expected ", T, " rows, got ", folded_rows(yb, out(), "out")));
    }
    Eigen::Map<const molora::RowMatrix<float>> xm(static_cast<const float*>(xb.ptr), T, in());
    Eigen::Map<molora::RowMatrix<float>> ym(y.mutable_data(), T, out());
    {
      py::gil_scoped_release release;
      layer_.forward(xm, ym, ws_);
    }
    return std::move(y);
  }

  Index in() const { return layer_.in_features(); }
  Index out() const { return layer_.out_features(); }
  Index experts() const { return layer_.adapter().num_experts(); }

 private:
  static molora::MoLoRAConfig make_config(Index in, Index out, Index experts, Index top_k, Index rank, double alpha,
                                          bool router_bias) {
    molora::MoLoRAConfig c;
    c.in_features = in;
    c.out_features = out;
    c.num_experts = experts;
    c.top_k = top_k;
    c.rank = rank;
    c.lora_alpha = alpha;
    c.router_bias = router_bias;
    return c;
  }

  Layer layer_;
  molora::MoLoRAWorkspace<float> ws_;
  py::object base_keep_;
};

template <class W>
void bind_layer(py::module_& m, const char* name) {
  using L = PyMoLoRALinear<W>;
  py::class_<L> c(m, name);
  c.def(py::init<Index, Index, Index, Index, Index, double, bool>(), py::arg("in_features"),
           py::arg("out_features"), py::arg("num_experts") = 8, py::arg("top_k") = 2, py::arg("rank") = 16,
           py::arg("lora_alpha") = 32.0, py::arg("router_bias") = true)
      .def("wrap_base_weight", &L::wrap_base_weight, py::arg("weight"))
      .def("set_router", &L::set_router, py::arg("weight"), py::arg("bias") = py::none())
      .def("set_expert", &L::set_expert, py::arg("e"), py::arg("A"), py::arg("B"))
      .def("set_base_strategy", &L::set_base_strategy, py::arg("strategy"))
      .def("forward", &L::forward, py::arg("x"), py::arg("out") = py::none())
      .def_property_readonly("in_features", &L::in)
      .def_property_readonly("out_features", &L::out);
  if constexpr (std::is_same_v<W, molora::bf16>)
    c.def("set_bf16_dot", &L::set_bf16_dot, py::arg("on")).def_property_readonly("bf16_dot", &L::bf16_dot);
}

}  // namespace

PYBIND11_MODULE(molora_py, m) {
  m.doc() = "molora's MoLoRALinear over numpy float32 arrays (for side-by-side benchmarks)";
  py::register_exception<molora::error>(m, "Error", PyExc_ValueError);
  bind_layer<float>(m, "MoLoRALinear");
  bind_layer<molora::bf16>(m, "MoLoRALinearBF16");
  bind_layer<molora::f16>(m, "MoLoRALinearF16");
  m.def("active_isa", [] { return molora::kernels::active_isa(); });
  m.def("force_isa", [](const std::string& isa) { molora::kernels::force_isa(isa); }, py::arg("isa"));
  m.def("set_num_threads", [](int n) {
#if MOLORA_USE_OPENMP
    omp_set_num_threads(n);
#else
    if (n != 1) throw molora::config_error(molora::detail::mismatch("threads (built without OpenMP)", 1, n));
#endif
  }, py::arg("n"));
#if MOLORA_USE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
