"""Drafters: proposers of token trees (n-gram, draft LM, EAGLE/MSD head) and the tree shaper they share;
built on `kernels/`, never on the engine."""
