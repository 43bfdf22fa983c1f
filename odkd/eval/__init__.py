"""Evaluation: COCO keypoint metrics, model evaluation, decoding choices, prediction pictures and training curves."""
