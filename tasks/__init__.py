"""LensMiner."""
