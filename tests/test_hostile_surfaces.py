"""docs/robustness.md's second table (caches, memory-mapped indexes, config files, commands,
the sampler): each row names the tests that check it, and a test keeps the two in step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SURFACE_CASES = [  # (bad input, what happens, the tests that check it)
    (
        "an image changed after the encoder cache was built (same size, new pixels, new "
        "`mtime`), rescanned or not",
        "its stored identity (path, size, `mtime_ns`) differs from `stat` on read: "
        "substituted like a failed decode (`SubstitutionWarning`: \"changed after the cache "
        "was built\"), never its old latents; a rebuild re-encodes exactly it",
        ["test_hostile_cache.py::test_a_file_changed_after_the_build_is_never_served_its_old_"
         "latents"],
    ),
    (
        "a cache rebuild (other settings) killed between writing `rows.parquet` and "
        "`cache.json`",
        "`cache.json` is written last and names the build its tables carry: the mixed folder "
        "is refused on open (\"belongs to another build\"); rerunning the build finishes it",
        ["test_hostile_cache.py::test_a_rebuild_killed_between_the_tables_and_cache_json_is_"
         "refused"],
    ),
    (
        "`build_cache`/`bucket-cache --out P` where P holds files with the cache's names "
        "(`rows.parquet`, `shards/*.safetensors`) but no `cache.json`",
        "`FileExistsError` before anything is written; only an empty folder or one marked by "
        "a build (`cache.json`, written first as a mark and last naming the tables) is used",
        ["test_hostile_cache.py::test_a_folder_that_only_looks_like_a_cache_is_never_adopted"],
    ),
    (
        "two builds (or a build and `prune`) of one cache folder at once",
        "the second is refused (`RuntimeError`: \"another build is writing\", a `flock` on "
        "`build.lock`); the first build's shard in progress is never deleted",
        ["test_hostile_cache.py::test_a_second_build_of_one_folder_is_refused_and_leaves_the_"
         "first_alone"],
    ),
    (
        "a cache shard whose safetensors header is edited to another dtype or shape; a shard "
        "cut short",
        "refused when read (`ValueError`: \"damaged or edited\", naming the shard): "
        "substituted, or raised with `on_error=\"raise\"`; a shard whose header does not read "
        "holds no entries and a rebuild encodes them again",
        ["test_hostile_cache.py::test_a_shard_header_edited_to_another_dtype_or_shape_is_"
         "refused"],
    ),
    (
        "`prune()` of a cache whose shards mix kept and unreferenced entries",
        "survivors are copied shard by shard into new shards of at most the shard byte cap; "
        "old shards are deleted only after the new ones are written",
        ["test_hostile_cache.py::test_prune_writes_shards_under_the_byte_cap"],
    ),
    (
        "random cache folder states and kill points (hypothesis: files dropped, truncated, "
        "swapped between builds, garbage `cache.json`, stray temporary files)",
        "opens and serves each row (its latents or a flagged substitute of its bucket) or is "
        "refused with a clear error; a rebuild gives the clean cache's view or refuses a "
        "folder that is no longer marked as ours",
        ["test_hostile_cache.py::test_sweep_random_cache_states_open_clean_or_refuse"],
    ),
    (
        "`bucket-report --json P` (or `--plot`, `--preview`) where P is a caption sidecar, a "
        "folder's `metadata.jsonl`, the scan cache, the manifest or an image it read",
        "exit 2, \"is an input of this report; refusing to write over it\", before anything "
        "is written; P left as it was",
        ["test_hostile_cli.py::test_report_never_writes_over_a_sidecar_a_metadata_file_or_its_"
         "scan_cache"],
    ),
    (
        "`bucket-caption` over a folder whose `.txt` sidecar is a symlink (to a file outside, "
        "or dangling into folders that do not exist) or whose image is reached through a "
        "symlinked folder, with or without `--overwrite`",
        "that sidecar is not written (\"not written: ... is a symlink (not followed)\" / "
        "\"would be written outside\"); no file or folder is created or replaced outside "
        "the folder; the other images are captioned",
        ["test_caption_cli.py::test_symlinked_sidecars_are_never_followed_or_written_through"],
    ),
    (
        "file names (and error details) holding terminal escapes, control characters or bidi "
        "overrides, printed by `bucket-report`, `bucket-cache`, `bucket-caption` or the "
        "dataset's `SubstitutionWarning`; random file names (hypothesis)",
        "every one goes through `bucketing.printable.escape` (`\\x1b`, `\\n`, `\\u202e`); "
        "the JSON report keeps the exact name",
        ["test_hostile_cli.py::test_every_command_uses_the_one_escaping_function",
         "test_hostile_cli.py::test_the_substitution_warning_escapes_the_file_name",
         "test_hostile_cli.py::test_bucket_cache_escapes_what_it_prints",
         "test_caption_cli.py::test_symlinked_sidecars_are_never_followed_or_written_through",
         "test_hostile_cli.py::test_sweep_random_file_names_through_bucket_report"],
    ),
    (
        "`batch_size x world_size` (or a per-bucket batch size from a pixel budget) beyond "
        "int64; `batch_size=10**29`",
        "`ValueError` naming the product (\"batch size x world size = 2**62 x 4 ... "
        "overflows\") or the value (`must be at most 2**62`), never `len(sampler) == 0`",
        ["test_hostile_sampler.py::test_a_global_step_beyond_int64_is_refused_by_name",
         "test_hostile_sampler.py::test_sizes_beyond_int64_are_refused_by_name",
         "test_hostile_sampler.py::test_sweep_every_accepted_size_samples_every_image"],
    ),
    (
        "bare bucket ids holding 10**8 (sparse ids)",
        "`ValueError` naming the id and its index (ids must be below 2**20: number them "
        "densely); no array sized by the largest id is allocated",
        ["test_hostile_sampler.py::test_bare_bucket_ids_are_never_sized_by_a_huge_id"],
    ),
    (
        "a memory-mapped `.arrow` index damaged on disk: path or caption offsets out of order "
        "or past their buffer, a column of another type, random byte changes (hypothesis)",
        "validated when opened (every buffer's offsets, lengths and UTF-8, each column's type, "
        "no null path or size): `ValueError` (\"damaged\", naming the file and column), never "
        "a segfault, bytes from outside a buffer or an emptied caption list",
        ["test_hostile_index.py::test_path_offsets_out_of_order_or_out_of_the_buffer_are_"
         "refused",
         "test_hostile_index.py::test_caption_list_offsets_that_would_empty_a_row_are_refused",
         "test_hostile_index.py::test_a_column_of_another_type_is_refused",
         "test_hostile_index.py::test_sweep_random_corruptions_load_whole_or_are_refused"],
    ),
    (
        "a config file over 1 MiB; a 600-byte YAML alias bomb; a recursive YAML alias; a TOML "
        "line of `[[` and 20,000 spaces; brackets nested 5,000 deep (TOML or YAML)",
        "`ConfigError` naming the file (and line) in well under a second: the size is checked "
        "before reading, YAML is parsed once (libyaml's `CSafeLoader` where present) and its "
        "node tree walked once with alias expansion bounded (100,000 nodes) and cycles "
        "refused, nesting beyond 32 levels is refused before any parser recurses, and the TOML "
        "line lookup is linear",
        ["test_hostile_config.py::test_a_file_over_one_mib_is_refused_unread",
         "test_hostile_config.py::test_a_yaml_alias_bomb_is_refused_fast",
         "test_hostile_config.py::test_a_recursive_yaml_alias_is_refused",
         "test_hostile_config.py::test_a_pathological_toml_line_is_read_in_linear_time",
         "test_hostile_config.py::test_deep_nesting_is_refused_before_any_parser_recurses"],
    ),
    (
        "config values: integer or duplicate YAML keys, `inf`/`nan`, a batch size of 10**29 or "
        "above 2**62, repeats above 65536, a `resolution` or `max_area` beyond `MAX_SIDE`, a "
        "ladder of more than 4096 buckets, `column_map` with unknown keys or non-string values; "
        "`BucketLadder.from_data(max_buckets=1.5)`",
        "`ConfigError` naming the file, the key and its line (for a key inside an inline "
        "table, the table's line), never a `RecursionError`, `TypeError`, `OverflowError` or "
        "an out-of-memory ladder; `from_data`: `TypeError`",
        ["test_hostile_config.py::test_odd_keys_and_numbers_are_config_errors_naming_key_and_"
         "line",
         "test_hostile_config.py::test_from_data_refuses_a_fractional_bucket_budget"],
    ),
    (
        "random TOML and YAML documents built from config fragments and junk (hypothesis)",
        "a `Config` or a `ConfigError` naming the file, within 2 s each; never another "
        "exception",
        ["test_hostile_config.py::test_sweep_random_toml_and_yaml_documents"],
    ),
    (
        "a large JPEG fitted by `decode_batch` into a much smaller bucket",
        "resized as uint8 and only the bucket's crop converted to float32: no full-size float "
        "copy of the decoded image (checked on the CPU device by recording every float tensor)",
        ["test_hostile_decode.py::test_decode_batch_makes_no_full_size_float_copy"],
    ),
    (
        "a photo that breaks at training time and is alone in its bucket (or whose "
        "bucket-mates fail too)",
        "an image of the nearest bucket whose scanned size covers this shape stands in, "
        "fitted to it without upscaling (`substituted=True`); where none can, the sample "
        "leaves its batch (`collate`: a short batch, `dropped` [D]) with a "
        "`SubstitutionWarning` naming the file; the epoch runs to its end",
        ["test_hostile_dataset.py::test_a_lone_broken_photo_takes_an_image_of_the_nearest_"
         "covering_bucket",
         "test_hostile_dataset.py::test_where_nothing_covers_the_sample_leaves_its_batch_and_"
         "the_epoch_runs",
         "test_hostile_dataset.py::test_the_device_decode_path_takes_short_and_empty_batches",
         "test_dataset.py::test_a_bucket_with_nothing_loadable_leaves_the_batch_with_a_warning"],
    ),
    (
        "`bucket-report --config` over datasets holding images smaller than every bucket, "
        "strips and files that are no images",
        "each reason counted by its own name (`too_small`, `not_an_image`, ...; no "
        "undocumented `not_assigned`) with up to three of its files named",
        ["test_hostile_config.py::test_the_mix_names_each_rejection_reason_and_its_files"],
    ),
]

SURFACE_TABLE = "| Bad input | What happens |\n|---|---|\n" + "".join(
    f"| {what} | {result} |\n" for what, result, _ in SURFACE_CASES
)


def test_docs_table_is_this_one(repo_root):
    text = (repo_root / "docs" / "robustness.md").read_text()
    block = text.split("<!-- section:robustness-surfaces -->", 1)[1].split("<!--", 1)[0]
    assert SURFACE_TABLE in block


@pytest.mark.parametrize("what,tests", [(w, t) for w, _, t in SURFACE_CASES])
def test_every_row_names_tests_that_exist(what, tests):
    for name in tests:
        file, func = name.split("::")
        tree = ast.parse((TESTS / file).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert func in defined, f"{what!r}: {name} does not exist"
