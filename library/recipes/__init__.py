"""One module per trainer kind (LoRA, textual inversion, DreamBooth, hypernetworks, embedding fine-tuning): its
config class and cross-section rules, the checks that need the file system or a tokenizer, optional steps before
the dataset scan, and `build(parts, run)` returning what is trained and its hooks. `run.py` runs any recipe:
parse → validate → resolve → load model → build → train.

A new trainer kind is one recipe module here plus a root script whose `main` calls `run_recipe`.
"""
