"""Evaluation: COCO keypoint metrics, model evaluation, prediction pictures and the run report."""
