from odkd.synth.dataset import make_synthetic_dataset

__all__ = ["make_synthetic_dataset"]
