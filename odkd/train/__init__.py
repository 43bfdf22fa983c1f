"""Training: the one loop, the teacher and the student trainers, and their losses."""
