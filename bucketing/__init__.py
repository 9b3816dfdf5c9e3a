"""What the data is: scan sources into an ImageIndex, define bucket ladders, assign
images to buckets without upscaling, and serve them as a map-style dataset."""

from bucketing.assign import Assignment, assign
from bucketing.dataset import TextToImageDataset
from bucketing.index import ImageIndex, Rejection
from bucketing.ladder import BucketLadder
from bucketing.scan import scan
from bucketing.sources import resolve_source

__all__ = [
    "Assignment",
    "BucketLadder",
    "ImageIndex",
    "Rejection",
    "TextToImageDataset",
    "assign",
    "resolve_source",
    "scan",
]
