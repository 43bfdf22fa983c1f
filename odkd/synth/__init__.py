"""A synthetic person-keypoint dataset in exact COCO 2017 format: the offline stand-in for COCO.

Each person is a 3D body (the 17 COCO joints with joint-angle limits and body proportions, plus
volumes for torso, limbs, head and hair) seen from any side, projected orthographically and
painted part by part, far to near. Left and right, self-occlusion and occlusion by other people
or by clutter therefore come out of the rendering itself. Keypoint flags, visible masks,
polygons and boxes are all read off the label maps that painted the image, so the labels agree
with the pixels.

A difficulty in [0, 1] sets how crowded, occluded, small and cluttered the scenes are; 0.5
("medium") is the default.

The labels are exact unless label_noise is set: then the train split's keypoints carry annotator
noise like COCO's, whose per-keypoint sigmas were measured from how far annotators' clicks fall
apart. missing_labels leaves a share of the train split's keypoints unlabelled, as COCO leaves the
joints its annotators skipped. Val and test stay exact and complete, so a model is scored against
where the joints are.

An unlabelled split stands in for COCO's unlabeled2017: its images, an image-info file, and the
boxes a person detector would give, imitated from the true people (misses, loose boxes, spread
scores, boxes on the background); its exact labels go to a file of their own, to score
pseudo-labels against.

One module per concern, each built on the ones before it: body (the 3D body, its pose and its
projection), appearance (painting a person), annotation (COCO labels read off the paint, and
annotators' errors), scene (a whole image), detections (a person detector's boxes on it),
dataset (the splits and their files).
"""

from odkd.synth.dataset import make_synthetic_dataset

__all__ = ["make_synthetic_dataset"]
