"""Static resource reports (registers, spills, shared memory) of the compiled GPU kernels, built without a GPU."""
