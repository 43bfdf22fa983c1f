"""COCO-format person instances and keypoint conventions, HRNet-style crops and targets, decoding, the loader."""
