"""FastFlow: 2-D normalising flows on backbone feature maps (distribution-map route)."""
