"""STPM: a student network regresses a pretrained teacher's feature pyramid (teacher-student route)."""
