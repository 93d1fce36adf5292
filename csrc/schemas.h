// The signatures of the insloc_ops operators (the part after the name), in one place: csrc/ops.cpp defines
// them, and the CUDA emulator's test library (csrc/emu/ops.cpp) defines the same ones.
#pragma once

namespace insloc::schema {

// features: L x [B, C, H_l, W_l]; rois: [R, 5]; levels: int64 [R] or None.
// Returns [L, R, C, ph, pw] (levels None) or [R, C, ph, pw].
constexpr const char* kRoiAlignMultilevel =
    "(Tensor[] features, Tensor rois, Tensor? levels, float[] spatial_scales, int pooled_height, "
    "int pooled_width, int sampling_ratio, bool aligned) -> Tensor";
// Gradient w.r.t. every level, each [B, C, H_l, W_l] in grad's dtype (channels_last if asked).
constexpr const char* kRoiAlignMultilevelBackward =
    "(Tensor grad, Tensor rois, Tensor? levels, float[] spatial_scales, int sampling_ratio, "
    "bool aligned, int batch_size, int channels, int[] heights, int[] widths, bool channels_last) "
    "-> Tensor[]";
// gt_boxes: [N, 4]; anchors: [A, 4]; seed: the counter-based random key's seed (SymInt: under torch.compile
// it is drawn inside the graph, a data-dependent int).
// Returns (anchor index int64 [N], iou float32 [N]).
constexpr const char* kSampleAnchorBoxes =
    "(Tensor gt_boxes, Tensor anchors, float iou_threshold, SymInt seed) -> (Tensor, Tensor)";
// q, k: [G, N, D]; queue: [G, K, D]. Returns (loss float32 [G, N], lse float32 [G, N]) where lse is the
// log-sum-exp of all K + 1 logits, saved for the backward.
constexpr const char* kQueueInfonce = "(Tensor q, Tensor k, Tensor queue, float temperature) -> (Tensor, Tensor)";
// Returns (grad_q [G, N, D], grad_k [G, N, D]), both in q's dtype.
constexpr const char* kQueueInfonceBackward =
    "(Tensor grad_loss, Tensor q, Tensor k, Tensor queue, Tensor lse, float temperature) -> (Tensor, Tensor)";
// One pass over the queue, for training (CPU kernel only): also returns neg_mean float32 [G, N, D],
// sum_j p_ij queue_j (the softmax-weighted mean of the negatives), from which the backward needs no pass
// over the queue. (loss, lse, neg_mean).
constexpr const char* kQueueInfonceOnepass =
    "(Tensor q, Tensor k, Tensor queue, float temperature) -> (Tensor, Tensor, Tensor)";
// Returns (grad_q, grad_k) in q's dtype.
constexpr const char* kQueueInfonceOnepassBackward =
    "(Tensor grad_loss, Tensor q, Tensor k, Tensor lse, Tensor neg_mean, float temperature) -> (Tensor, Tensor)";

}  // namespace insloc::schema
