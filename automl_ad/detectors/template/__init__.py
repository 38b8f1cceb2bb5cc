"""Template matching: registered difference to a golden template of normal images (template-matching route)."""
