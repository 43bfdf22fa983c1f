"""Training (teachers and students), inference, evaluation and export."""
