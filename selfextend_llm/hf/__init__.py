"""The transformers adapter: :mod:`.attention` (the attention and mask functions registered by
name) and :mod:`.apply` (turning SelfExtend on and off for a loaded model)."""
