"""Training: the one loop, torchrun ranks, the teacher and the student trainers, and releasing teachers."""
