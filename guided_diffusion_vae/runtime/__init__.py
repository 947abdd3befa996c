"""Plumbing every layer uses: errors and one-line messages, atomic files, processes
(torch.distributed / MPI), logging and progress, flags and YAML configs, image
files, CUDA graphs. Imports nothing else of the package."""
