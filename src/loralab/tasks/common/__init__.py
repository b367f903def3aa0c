"""Pieces every experiment shares: what trains (setup), padding (batches), the causal-LM loss and
held-out loss (causal_lm), left-padded batched generation (generation), subsampling (sampling), and
the result in the common schema (results)."""
