"""What a trainer adds to a model and the files other tools load: network kinds behind one interface
(LoRA/LoCon, LoHa, LoKr), textual-inversion embeddings, A1111 hypernetworks (applied through hooks: they change
what attention reads, not a weight, so they are no mergeable kind), embedding fine-tuning's token rows, and the
tools' shared pieces (merge, extract, metadata).

A new network kind is one module here plus its entry in the registry (`kinds.py`).
"""
