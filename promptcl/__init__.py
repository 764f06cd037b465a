"""promptcl: prompt-based continual learning on pretrained ViTs."""
