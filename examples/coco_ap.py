"""COCO-style box AP, compact: AP@[.5:.95] (mean over IoU 0.50, 0.55, ..., 0.95) and AP50, each the
101-point interpolated area under the precision envelope, averaged over the classes that have ground
truth. Matching follows the COCO evaluation: per image and class, detections in descending score (at
most ``max_dets`` per image) take the unmatched ground-truth box of highest IoU >= threshold. No area
ranges and no crowd boxes (the tree data has neither)."""
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class APResult:
    ap: float  # AP@[.5:.95]
    ap50: float
    ap75: float
    per_threshold: list[float]  # AP at each of IOU_THRESHOLDS


def _match(det_boxes, gt_boxes, threshold):
    """det_boxes [D, 4] (sorted by score, descending), gt_boxes [G, 4] -> [D] bool: true positive."""
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    iou = box_iou(det_boxes, gt_boxes).numpy()  # [D, G]
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in range(len(det_boxes)):
        candidates = np.where(~taken & (iou[d] >= threshold), iou[d], -1.0)  # [G]
        g = int(candidates.argmax())
        if candidates[g] >= 0:
            taken[g], tp[d] = True, True
    return tp


def average_precision(scores, tp, num_gt):
    """101-point interpolated AP of detections (scores [D], tp [D] bool) against num_gt boxes."""
    if num_gt == 0:
        raise ValueError("AP is undefined without ground truth")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")  # stable, as COCO's evaluation
    tp = tp[order]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(~tp)
    recall = tp_cum / num_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # precision made non-increasing in recall
    index = np.searchsorted(recall, RECALL_POINTS, side="left")  # first detection reaching each recall point
    reached = index < len(envelope)
    return float(np.where(reached, envelope[np.minimum(index, len(envelope) - 1)], 0.0).mean())


def coco_ap(predictions, targets, max_dets=100):
    """predictions: per image {"boxes" [D, 4] xyxy, "scores" [D], "labels" [D]}; targets: per image
    {"boxes" [G, 4], "labels" [G]}. Returns an :class:`APResult`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    per_class = []  # [classes][thresholds]
    for c in classes:
        num_gt = sum(int((t["labels"] == c).sum()) for t in targets)
        per_threshold = []
        for threshold in IOU_THRESHOLDS:
            scores, tps = [], []
            for pred, target in zip(predictions, targets):
                keep = pred["labels"] == c
                order = torch.argsort(pred["scores"][keep], descending=True, stable=True)[:max_dets]
                boxes, image_scores = pred["boxes"][keep][order].float(), pred["scores"][keep][order]
                scores.append(image_scores.detach().cpu().numpy())
                tps.append(_match(boxes.detach().cpu(), target["boxes"][target["labels"] == c].float().cpu(),
                                  threshold))
            per_threshold.append(average_precision(np.concatenate(scores), np.concatenate(tps), num_gt))
        per_class.append(per_threshold)
    if not per_class:
        raise ValueError("no ground-truth boxes: AP is undefined")
    by_threshold = np.mean(per_class, axis=0)  # [thresholds]
    return APResult(float(by_threshold.mean()), float(by_threshold[0]), float(by_threshold[5]),
                    [float(v) for v in by_threshold])
