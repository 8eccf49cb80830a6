"""Token-level smoothing (Elbayad et al. 2018 §3.3): embeddings (loader and
PPMI-SVD builder), sparse top-k targets, and the losses criterions apply."""
