#pragma once
// Losses over logits (rows x classes). Targets are soft (each row sums to one): hard labels
// with label smoothing, mixup and cutmix all arrive here as soft targets.
#include <vector>

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
    expect_shape(teacher, student.shape(), "DistillationLoss teacher logits");
    const int rows = int(student.rows()), cols = int(student.cols());
    const double norm = double(rows) * cols;
    p_teacher_.resize(student.shape());
    B::softmax_forward(p_teacher_.data(), teacher.data(), rows, cols, T(1 / temp_));
    scaled_.resize(student.shape());
    B::copy(scaled_.data(), teacher.data(), teacher.numel());
    B::scale(scaled_.data(), T(1 / temp_), scaled_.numel());
    const double entropy = B::softmax_cross_entropy(nullptr, scaled_.data(), p_teacher_.data(), rows, cols, T(0));
    B::copy(scaled_.data(), student.data(), student.numel());
    B::scale(scaled_.data(), T(1 / temp_), scaled_.numel());
    grad_.resize(student.shape());
    // d/dz_S = T^2 / (B C) * (p_S - p_T) / T
    const double cross = B::softmax_cross_entropy(grad_.data(), scaled_.data(), p_teacher_.data(), rows, cols,
                                                  T(temp_ / norm));
    return temp_ * temp_ * (cross - entropy) / norm;
  }
  const Tensor<B>& grad() const { return grad_; }

 private:
  double temp_;
  Tensor<B> p_teacher_, scaled_, grad_;
};

}  // namespace hatch
