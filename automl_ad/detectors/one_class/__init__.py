"""One-class route: a learned region (hypersphere) that encloses the normal data."""
