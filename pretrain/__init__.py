"""Pretraining recipes (Keye-VL-1.5 stages 0-3, sequence packing, checkpoint merging)."""
