"""The on-disk format: record schema, identifiers, segments, blobs, manifests and durable file I/O.

The only code that knows the bytes of a journal; everything else goes through it."""
