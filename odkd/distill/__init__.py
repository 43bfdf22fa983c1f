"""The student's side of the method: stored teacher maps warped into each augmented crop, the KD
losses, and the orderly stage schedule. Reads the teacher store through its reader only."""
