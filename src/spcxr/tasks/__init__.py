"""Downstream tasks: classification fine-tuning / linear probing, lung segmentation, evaluation."""
