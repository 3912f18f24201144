"""Base models: model families (what differs between SD1, SD2, SDXL: encoders, conditioning, file layouts,
key names, metadata, pipelines), loading from built-in tiny configs, diffusers folders and single files,
saving, the offline CLIP tokenizer and the attention backend.

A new model family is one module in `families/` plus its entry in the registry there.
"""
