"""Expert causal LMs: TLinFormer, TConstFormer and the standard Transformer baseline."""
