"""PatchCore: nearest-neighbour distance of patch features to a coreset memory bank (memory-bank route)."""
