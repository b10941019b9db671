"""Evaluation: FID/KID and precision/recall on the standard Inception features, reconstruction errors."""
