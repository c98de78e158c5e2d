"""Side-by-side benchmarks of diffusekit against diffusers on the same weights (see BENCHMARKS.md)."""
