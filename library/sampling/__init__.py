"""Images from a model: preview sampling during training, kohya prompt files, image grids and compare.py's
X/Y/Z plots."""
