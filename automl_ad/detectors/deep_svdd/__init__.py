"""Deep SVDD on patch features: distance to a learnt hypersphere centre (one-class route)."""
