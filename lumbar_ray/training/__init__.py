"""Training: examples, folds, the detector and DeepScoreNet loops, the cross-validated driver on Ray Train/Tune, registry publishing, scheduled retraining."""
