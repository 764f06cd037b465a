"""Model building blocks: the prefix-attention core, gates, prompt experts, backbones, statistics."""
