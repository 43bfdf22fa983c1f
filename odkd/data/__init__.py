"""COCO-format person instances, HRNet-style crops and targets, decoding, the synthetic dataset."""
