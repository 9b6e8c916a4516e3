"""Phase 3, learn: tensors, normalisation, augmentation, models and training."""
