"""Parquet manifests: only the image, caption and paired-file columns are read, batch by
batch."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow.parquet as pq

from bucketing.index import Rejection
from bucketing.sources.rows import PairedColumns, Record, pick_columns, pick_paired


def read_parquet(
    path: str, column_map: dict[str, str], rejections: list[Rejection]
) -> tuple[str, str | None, Iterable[Record], PairedColumns]:
    """(image column, caption column, records, paired columns) of a ``.parquet``
    manifest."""
    file = pq.ParquetFile(path)
    image, caption = pick_columns(file.schema_arrow.names, column_map, path)
    paired = pick_paired(file.schema_arrow.names, column_map, path)
    wanted = list(dict.fromkeys([image] + ([caption] if caption else []) + paired.wanted))
    records = (
        (f"row {n}", row)
        for n, row in enumerate(
            r for batch in file.iter_batches(columns=wanted) for r in batch.to_pylist()
        )
    )
    return image, caption, records, paired
