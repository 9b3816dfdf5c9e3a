"""Encode once: VAE latents and text embeddings computed before training, read by bucket.

``build_cache(index, assignment, encoders, path)`` runs the frozen encoders over every
accepted image (one bucket per VAE batch, decoded and fitted exactly as the dataset fits
pixels) and every distinct caption (each once, plus the empty caption for dropout), and
stores the results under ``path``; ``EncoderCache.open(path)`` reads them back, and
``TextToImageDataset(index, assignment, encoder_cache=cache)`` serves them instead of pixels.

Layout of a cache folder (no pickle anywhere; every file written atomically)::

    cache.json             format, version, model, encoder fingerprints, dtype, settings
                           and the build id its tables carry (written first as a mark,
                           last whole)
    build.lock             held (flock) by the one build or prune at work
    rows.parquet           the last build's view: per image, its identity, size, bucket,
                           crop boxes and entry keys
    texts.parquet          per caption, its entry key
    entries.parquet        table of contents: entry key -> shard file
    shards/*.safetensors   the tensors, memory-mapped when read

Entries are content-keyed (SHA-256) by everything that determines them: an image entry by
the file's identity (path, size, mtime_ns), its bucket, resized size, crop box and flip,
every fit setting (resample filter, upscaling) and decode setting that changes pixels
(background, JPEG draft decoding: ``transforms.image.DecodeSettings``, whose limits the build
applies as the dataset does), the VAE's
fingerprint (class, config, weights) and the dtype; a text entry by the caption, the text
encoders' fingerprint, the T5 length and the padding mode. A build encodes only the keys the
store lacks, so adding images, changing the ladder or a caption re-encodes exactly what
changed, and a cache built by other weights is never used for these (its keys differ).

Shards are written every ``shard_size`` entries, each atomically: a build killed at any
moment keeps every finished shard and loses at most the one in progress; rerunning resumes.
Under ``torchrun`` (``torch.distributed`` initialised) each rank encodes every
``world_size``-th batch into its own shards and rank 0 writes the merged view.
"""

from bucketing.pipeline.encoder_cache.build import build_cache
from bucketing.pipeline.encoder_cache.estimate import MODEL_SIZES, estimate_bytes, estimate_lines
from bucketing.pipeline.encoder_cache.keys import CROPS, T5_PADDINGS, FitSettings
from bucketing.pipeline.encoder_cache.reader import EncoderCache

__all__ = ["CROPS", "MODEL_SIZES", "T5_PADDINGS", "EncoderCache", "FitSettings", "build_cache",
           "estimate_bytes", "estimate_lines"]
