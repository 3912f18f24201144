"""What a trainer adds to a model and the files other tools load: network kinds behind one interface
(LoRA/LoCon today), textual-inversion embeddings, and the tools' shared pieces (merge, extract, metadata).

A new network kind is one module here plus its entry in the registry (`kinds.py`).
"""
