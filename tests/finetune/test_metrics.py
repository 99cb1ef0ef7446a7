"""Metrics are exact on hand-made inputs (counts worked out by hand), including ignore_index and absent classes."""

import math

import pytest
import torch

from evforge.finetune.metrics import (
    accuracy,
    accuracy_from_confusion,
    class_accuracy_from_confusion,
    confusion_matrix,
    iou_from_confusion,
    mean_class_accuracy,
    mean_class_accuracy_from_confusion,
    mean_iou_from_confusion,
    topk_accuracy,
)

PRED = torch.tensor([0, 1, 2, 2, 1, 0, 2])
TRUE = torch.tensor([0, 1, 1, 2, 0, 0, 2])


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
    cm = confusion_matrix(PRED, TRUE, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[2, 1, 0],   # true 0: predicted 0 twice, 1 once
                           [0, 1, 1],   # true 1: predicted 1 once, 2 once
                           [0, 0, 2]]   # true 2: predicted 2 twice
    assert confusion_matrix(PRED.view(7, 1), TRUE.view(7, 1), 4).tolist()[3] == [0, 0, 0, 0]  # any shape, more classes


def test_ignore_index_drops_those_targets_and_range_is_checked():
    pred = torch.tensor([[0, 1], [1, 7]])
    true = torch.tensor([[0, 255], [1, 255]])  # the 7 sits on an ignored pixel: not counted, no error
    assert confusion_matrix(pred, true, 2, ignore_index=255).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix(pred, true, 2)  # 255 is a class id without ignore_index
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred, true.view(-1), 2)


def test_accuracy_and_per_class_from_counts():
    cm = confusion_matrix(PRED, TRUE, 3)
    assert accuracy_from_confusion(cm) == 5 / 7
    assert accuracy(PRED, TRUE) == 5 / 7
    assert class_accuracy_from_confusion(cm).tolist() == [2 / 3, 1 / 2, 1.0]
    assert mean_class_accuracy_from_confusion(cm) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3, abs=0, rel=1e-15)
    assert mean_class_accuracy(PRED, TRUE, 3) == mean_class_accuracy_from_confusion(cm)


def test_absent_classes_are_nan_and_left_out_of_the_means():
    pred, true = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    cm = confusion_matrix(pred, true, 4)  # classes 2 and 3 never occur; class 3 is never predicted either
    acc = class_accuracy_from_confusion(cm)
    assert acc[:2].tolist() == [1.0, 0.5] and math.isnan(acc[2]) and math.isnan(acc[3])
    assert mean_class_accuracy_from_confusion(cm) == 0.75
    iou = iou_from_confusion(cm)  # class 0: tp 1, fp 1 (a true 1), fn 0 -> 1/2; class 1: tp 1, fn 1 -> 1/2
    assert iou[:2].tolist() == [0.5, 0.5] and math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou_from_confusion(cm) == 0.5


def test_iou_counts_false_positives_of_classes_absent_from_the_truth():
    pred, true = torch.tensor([2, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    iou = iou_from_confusion(confusion_matrix(pred, true, 3))
    assert iou.tolist() == [0.5, 1.0, 0.0]  # class 2 was predicted once, never true: IoU 0, not nan
    assert mean_iou_from_confusion(confusion_matrix(pred, true, 3)) == 0.5


def test_empty_inputs_give_nan():
    empty = torch.zeros(0, dtype=torch.int64)
    cm = confusion_matrix(empty, empty, 3)
    assert cm.sum() == 0
    assert math.isnan(accuracy_from_confusion(cm)) and math.isnan(mean_class_accuracy_from_confusion(cm))
    assert math.isnan(mean_iou_from_confusion(cm)) and math.isnan(accuracy(empty, empty))
    assert math.isnan(topk_accuracy(torch.zeros(0, 3), empty, (1,))[1])
    only_ignored = torch.tensor([255, 255])
    assert math.isnan(accuracy(torch.tensor([0, 1]), only_ignored, ignore_index=255))


def test_top_k_accuracy_and_scores_as_input():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.0],   # true 2: second best
                           [0.9, 0.0, 0.05, 0.04],  # true 0: best
                           [0.2, 0.3, 0.1, 0.4]])   # true 2: last -> only in the top 4
    true = torch.tensor([2, 0, 2])
    assert topk_accuracy(scores, true, (1, 2, 3, 4, 5)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0, 5: 1.0}
    assert accuracy(scores, true) == 1 / 3  # argmax of the scores
    assert mean_class_accuracy(scores, true, 4) == (1.0 + 0.0) / 2  # class 0: 1/1, class 2: 0/2
