"""memwatch: detect memorization in diffusion models while they train."""
