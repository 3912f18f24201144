"""Training data: `NN_name` folders and captions, image decoding, aspect-ratio buckets, the content-keyed
latent cache, and the per-batch sources the loop reads (batches, latents, text conditioning).

Every random choice is derived from (seed, epoch, position), so a resumed run sees exactly what an
uninterrupted one would.
"""
