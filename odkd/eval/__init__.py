"""Evaluation: COCO keypoint metrics (PCK, AUC and EPE for hands), model evaluation, decoding choices, prediction
pictures and training curves."""
