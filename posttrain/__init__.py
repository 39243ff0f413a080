"""Post-training recipes (SFT, GSPO reinforcement learning, preference alignment)."""
