"""FWP layers (attention blocks, feature maps, norms, short convolutions)."""
