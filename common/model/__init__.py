"""The frozen CLIP and what methods attach to it: MMA adapters, learned prompts, the expert gate,
and the role predicate that says which of their tensors are frozen, private or shared."""
