"""Dataset preparation (tag_images.py): WD14 tagging and captioning, batch tag edits with backups, and
focus-aware cropping into the `NN_name` layout."""
