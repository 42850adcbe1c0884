#pragma once
// Losses over logits (rows x classes). Targets are soft (each row sums to one): hard labels
// with label smoothing, mixup and cutmix all arrive here as soft targets.
#include <string>
#include <vector>

#include "hatch/backend/async.hpp"
#include "hatch/core/parameter.hpp"

namespace hatch {

// Host-side: one-hot targets with label smoothing (off = s / C, on = 1 - s + off), timm's form.
inline std::vector<float> smoothed_one_hot(const std::vector<int>& labels, int classes, double smoothing) {
  std::vector<float> t(labels.size() * classes, float(smoothing / classes));
  for (std::size_t r = 0; r < labels.size(); ++r) t[r * classes + labels[r]] += float(1 - smoothing);
  return t;
}

// Mean over the batch of -sum_c t_c log softmax(z)_c; its gradient w.r.t. the logits.
template <Backend B>
class SoftTargetCrossEntropy {
 public:
  using T = typename B::Scalar;
  double forward_backward(const Tensor<B>& logits, const Tensor<B>& targets) {
    expect_shape(targets, logits.shape(), "SoftTargetCrossEntropy targets");
    const int rows = int(logits.rows()), cols = int(logits.cols());
    grad_.resize(logits.shape());
    return B::softmax_cross_entropy(grad_.data(), logits.data(), targets.data(), rows, cols, T(1.0 / rows)) / rows;
  }
  // The same, with the loss written into a step scalar instead of returned: the host need not
  // wait for it (backend/async.hpp).
  void forward_backward_into(const Tensor<B>& logits, const Tensor<B>& targets, StepScalars<B>& s, int slot) {
    expect_shape(targets, logits.shape(), "SoftTargetCrossEntropy targets");
    const int rows = int(logits.rows()), cols = int(logits.cols());
    grad_.resize(logits.shape());
    s.softmax_cross_entropy(slot, grad_.data(), logits.data(), targets.data(), rows, cols, T(1.0 / rows), rows);
  }
  const Tensor<B>& grad() const { return grad_; }

 private:
  Tensor<B> grad_;
};

// Logit distillation as in DeiT and m2mKD:
//   T^2 * sum p_T (log p_T - log p_S) / (B * C),  p = softmax(z / T),
// computed as cross-entropies: KL(p_T || p_S) = CE(z_S / T; p_T) - CE(z_T / T; p_T).
template <Backend B>
class DistillationLoss {
 public:
  using T = typename B::Scalar;
  explicit DistillationLoss(double temperature = 1.0) : temp_(temperature) {}
  double forward_backward(const Tensor<B>& student, const Tensor<B>& teacher) {
    double sums[2] = {0, 0};  // the teacher's entropy, the cross-entropy (summed over rows)
    run(student, teacher, [&](int k, T* dz, const T* z, const T* t, int rows, int cols, T scale) {
      sums[k] = B::softmax_cross_entropy(dz, z, t, rows, cols, scale);
    });
    return temp_ * temp_ * (sums[1] - sums[0]) / (double(student.rows()) * double(student.cols()));
  }
  // The same, with the two sums written into step scalars (backend/async.hpp) instead of
  // returned: the loss is weight(student) * (slot cross - slot entropy).
  void forward_backward_into(const Tensor<B>& student, const Tensor<B>& teacher, StepScalars<B>& s,
                             int entropy_slot, int cross_slot) {
    run(student, teacher, [&](int k, T* dz, const T* z, const T* t, int rows, int cols, T scale) {
      s.softmax_cross_entropy(k == 0 ? entropy_slot : cross_slot, dz, z, t, rows, cols, scale, 1.0);
    });
  }
  // T^2 / (B * C): what the difference of the two sums is multiplied by.
  double weight(const Tensor<B>& student) const {
    return temp_ * temp_ / (double(student.rows()) * double(student.cols()));
  }
  const Tensor<B>& grad() const { return grad_; }

 private:
  // The teacher's entropy through ce(0, ...), then the cross-entropy and the gradient through
  // ce(1, ...); ce(k, dz, z, t, rows, cols, scale) is a softmax cross-entropy sum over rows.
  template <class Ce>
  void run(const Tensor<B>& student, const Tensor<B>& teacher, Ce&& ce) {
    expect_shape(teacher, student.shape(), "DistillationLoss teacher logits");
    const int rows = int(student.rows()), cols = int(student.cols());
    const double norm = double(rows) * cols;
    p_teacher_.resize(student.shape());
    B::softmax_forward(p_teacher_.data(), teacher.data(), rows, cols, T(1 / temp_));
    scaled_.resize(student.shape());
    B::copy(scaled_.data(), teacher.data(), teacher.numel());
    B::scale(scaled_.data(), T(1 / temp_), scaled_.numel());
    ce(0, nullptr, scaled_.data(), p_teacher_.data(), rows, cols, T(0));
    B::copy(scaled_.data(), student.data(), student.numel());
    B::scale(scaled_.data(), T(1 / temp_), scaled_.numel());
    grad_.resize(student.shape());
    // d/dz_S = T^2 / (B C) * (p_S - p_T) / T
    ce(1, grad_.data(), scaled_.data(), p_teacher_.data(), rows, cols, T(temp_ / norm));
  }
  double temp_;
  Tensor<B> p_teacher_, scaled_, grad_;
};

// m2mKD's objective (ALGORITHMS.md §2): (1 - a) CE(z_S; targets) + a KD_T(z_S, z_T).
template <Backend B>
class DistilledCrossEntropy {
 public:
  using T = typename B::Scalar;
  explicit DistilledCrossEntropy(double alpha = 0.5, double temperature = 1.0) : alpha_(alpha), kd_(temperature) {
    require(alpha >= 0 && alpha <= 1, "DistilledCrossEntropy", "alpha must be in [0, 1], got " + std::to_string(alpha));
    require(temperature > 0, "DistilledCrossEntropy", "the temperature must be positive");
  }
  double forward_backward(const Tensor<B>& student, const Tensor<B>& targets, const Tensor<B>& teacher) {
    const double ce = ce_.forward_backward(student, targets);
    const double kd = kd_.forward_backward(student, teacher);
    mix_gradients(student);
    last_ce_ = ce;
    last_kd_ = kd;
    return (1 - alpha_) * ce + alpha_ * kd;
  }
  // The same gradient, with the loss written into step scalar `slot`, combined by the host from
  // slots slot + 1 .. slot + 3 when the values are read (StepScalars::combine): fit need not wait
  // for the device before the step's end. last_cross_entropy/last_distillation are not updated.
  static constexpr int scalar_slots = 4;
  void forward_backward_into(const Tensor<B>& student, const Tensor<B>& targets, const Tensor<B>& teacher,
                             StepScalars<B>& s, int slot) {
    ce_.forward_backward_into(student, targets, s, slot + 1);  // the batch mean
    kd_.forward_backward_into(student, teacher, s, slot + 2, slot + 3);
    mix_gradients(student);
    const double w = alpha_ * kd_.weight(student);
    s.combine(slot, {{slot + 1, 1 - alpha_}, {slot + 3, w}, {slot + 2, -w}});
  }
  const Tensor<B>& grad() const { return grad_; }
  double last_cross_entropy() const { return last_ce_; }
  double last_distillation() const { return last_kd_; }

 private:
  void mix_gradients(const Tensor<B>& student) {  // (1 - a) dCE + a dKD
    grad_.resize(student.shape());
    B::copy(grad_.data(), ce_.grad().data(), grad_.numel());
    B::scale(grad_.data(), T(1 - alpha_), grad_.numel());
    B::axpy(grad_.data(), T(alpha_), kd_.grad().data(), grad_.numel());
  }
  double alpha_;
  SoftTargetCrossEntropy<B> ce_;
  DistillationLoss<B> kd_;
  Tensor<B> grad_;
  double last_ce_ = 0, last_kd_ = 0;
};

}  // namespace hatch
