"""Sampling runs: the denoising loop with capture (teacher-forced and rollout) and the extraction cache."""
