"""Weight conversion between sdjax's NNX modules and the PyTorch formats (diffusers folders, CompVis single files)."""
