// Plain LoRA training (PEFT's single adapter, no router): add_delta_train records on a
// LoRATape what add_backward needs (x, the dropout mask, h = A x), and add_backward adds
// dL/dA, dL/dB into LoRAGrads and, when asked, dL/dx. The MoLoRA layers' training is in
// backward.hpp; both draw their dropout from noise.hpp.
#pragma once

#include "errors.hpp"
#include "lora.hpp"
#include "noise.hpp"
#include "random.hpp"
#include "saved_input.hpp"
#include "types.hpp"

namespace molora {

// What a LoRA training forward saves. One per layer and step; reuse it across steps (warm
// tapes of the same size do not allocate). Seed it for reproducible dropout.
template <class Scalar>
struct LoRATape {
  TrainingOptions options;
  Generator noise_rng{0x6c6f72612d6e6fULL};  // dropout draws

  detail::SavedInput<Scalar> x;      // [T, in]
  RowMatrix<Scalar> dropout_scale;   // [T, in] 0 or 1/(1-p); empty without dropout
  RowMatrix<Scalar> adapter_input;   // [T, in] x * dropout_scale; empty without dropout
  RowMatrix<Scalar> hidden;          // [T, r] h = A x (unscaled)
  RowMatrix<Scalar> u;               // [T, r] backward scratch
  RowMatrix<Scalar> dxa;             // [T, in] backward scratch (dropout only)
  detail::InUseFlag in_use;          // held by the call writing this tape

  void seed(std::uint64_t s) { noise_rng.seed(s); }
  Index num_tokens() const { return x.rows; }
  bool has_dropout() const { return dropout_scale.size() > 0; }
  typename detail::SavedInput<Scalar>::View input() const { return x.view(); }
};

// dL/dA [r, in] and dL/dB [out, r] of one LoRA, in the LoRA's own layouts.
template <class Scalar>
struct LoRAGrads {
  RowMatrix<Scalar> A;  // [rank, in]
  ColMatrix<Scalar> B;  // [out, rank]

  LoRAGrads() = default;
  explicit LoRAGrads(const LoRA<Scalar>& lora) { resize_like(lora); }
  void resize_like(const LoRA<Scalar>& lora) {
    A.setZero(lora.rank(), lora.in_features());
    B.setZero(lora.out_features(), lora.rank());
  }
  void zero() {
    A.setZero();
    B.setZero();
  }
};

// y += s * B A dropout(x) for x [T, in], y [T, out], saving into tape what add_backward needs.
// x must stay alive and unchanged until add_backward (unless it shares memory with y: then the
// tape keeps a copy). Throws shape_error on shapes, config_error on bad tape.options,
// state_error on a moved-from lora or a tape in use; y is unchanged when it throws.
template <class Scalar, class Derived>
void add_delta_train(const LoRA<Scalar>& lora, const Eigen::MatrixBase<Derived>& x_in, detail::OutRef<Scalar> y,
                     LoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "LoRATape");
  const ConstRowRef<Scalar> x(x_in);
  lora.check_live();
  tape.options.validate();
  if (x.cols() != lora.in_features())
    throw shape_error(detail::mismatch("x columns (in_features)", lora.in_features(), x.cols()));
  detail::require_shape(y, x.rows(), lora.out_features(), "y shape");
  tape.x.save(x, y);
  const auto xs = tape.x.view();
  detail::apply_noise(xs, tape.options.lora_dropout, tape.noise_rng, tape.dropout_scale, tape.adapter_input,
                      detail::draw_dropout<Scalar>);
  tape.hidden.resize(x.rows(), lora.rank());
  if (tape.has_dropout())
    tape.hidden.noalias() = tape.adapter_input * lora.A().transpose();  // [T, r]
  else
    tape.hidden.noalias() = xs * lora.A().transpose();  // [T, r]
  y.noalias() += (tape.hidden * lora.scaling()) * lora.B().transpose();  // [T, out]
}

namespace detail {

// A backward trusts nothing on the tape: it must have been recorded by a layer of this shape.
template <class Scalar>
void check_tape(const LoRA<Scalar>& lora, const LoRATape<Scalar>& tape) {
  const Index T = tape.num_tokens(), in = lora.in_features();
  check_saved_input(tape.x, in);
  require_shape(tape.hidden, T, lora.rank(), "tape.hidden shape (tokens, rank)");
  if (tape.has_dropout()) {
    require_shape(tape.dropout_scale, T, in, "tape.dropout_scale shape");
    require_shape(tape.adapter_input, T, in, "tape.adapter_input shape");
  }
}

template <class Scalar>
void lora_backward_impl(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                        LoRAGrads<Scalar>& grads, RowRef<Scalar>* dx) {
  const WorkspaceGuard hold(tape.in_use, "LoRATape");
  lora.check_live();
  check_tape(lora, tape);
  const Index T = tape.num_tokens(), r = lora.rank();
  const Scalar s = lora.scaling();
  detail::require_shape(dy, T, lora.out_features(), "dy shape");
  detail::require_shape(grads.A, r, lora.in_features(), "grads.A shape");
  detail::require_shape(grads.B, lora.out_features(), r, "grads.B shape");
  if (dx) detail::require_shape(*dx, T, lora.in_features(), "dx shape");
  if (T == 0) return;
  grads.B.noalias() += dy.transpose() * (tape.hidden * s);  // [out, r]
  tape.u.resize(T, r);
  tape.u.noalias() = (dy * lora.B()) * s;  // [T, r] dL/dh
  if (tape.has_dropout())
    grads.A.noalias() += tape.u.transpose() * tape.adapter_input;  // [r, in]
  else
    grads.A.noalias() += tape.u.transpose() * tape.input();  // [r, in]
  if (!dx) return;
  if (tape.has_dropout()) {
    tape.dxa.resize(T, lora.in_features());
    tape.dxa.noalias() = tape.u * lora.A();  // [T, in]
    dx->array() += tape.dxa.array() * tape.dropout_scale.array();
  } else {
    dx->noalias() += tape.u * lora.A();  // [T, in]
  }
}

}  // namespace detail

// Adds dL/dA, dL/dB into grads and, when dx is given, adds dL/dx [T, in] into dx (the host
// adds the base's own x-gradient). dy [T, out] with T of the last add_delta_train on tape.
// grads must be sized for lora (LoRAGrads(lora)). Throws shape_error on shapes.
template <class Scalar>
void add_backward(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  LoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  detail::lora_backward_impl(lora, tape, dy, grads, &dx);
}
template <class Scalar>
void add_backward(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  LoRAGrads<Scalar>& grads) {
  detail::lora_backward_impl(lora, tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

}  // namespace molora
