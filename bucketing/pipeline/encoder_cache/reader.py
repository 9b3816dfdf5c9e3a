"""Reading a built cache: latents per image and variant, embeddings per caption."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from bucketing.pipeline.encoder_cache.keys import TRIMMED_MODELS
from bucketing.pipeline.encoder_cache.store import (
    ShardWriter,
    build_lock,
    check_view,
    load_entries,
    read_meta,
    write_entries,
)
from transforms.resize_crop import (
    FitParams,
)

if TYPE_CHECKING:
    pass



# --------------------------------------------------------------------------- reading


class EncoderCache:
    """A built cache: per image its latents (per crop variant and flip), per caption its
    embeddings. Read with :meth:`latent_sample` / :meth:`text_sample` (what
    ``TextToImageDataset(..., encoder_cache=cache)`` calls) or :meth:`latents` / :meth:`text`.
    Picklable: DataLoader workers reopen the shards, memory-mapped, on first use."""

    def __init__(self, root: Path, meta: dict[str, Any], rows: dict[str, list],
                 texts: dict[str, str], entries: dict[str, str]) -> None:
        self.root, self.meta = root, meta
        self.model: str = meta["model"]
        self.flip_p = float(meta["flip_p"])
        self.variants = int(meta["variants"])
        self.t5_padding: str = meta["t5_padding"]
        self.images = bool(meta.get("images", True))  # False: text embeddings only
        self.rows = rows
        self._by_path = {p: i for i, p in enumerate(rows["path"])}
        self._texts = texts
        self._entries = entries
        self._handles: dict[str, Any] = {}
        self._resident: dict[str, torch.Tensor] | None = None
        self.build_stats: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> EncoderCache:
        """Open a cache folder; raises a clear error for a missing, foreign or old one."""
        root = Path(path)
        meta = read_meta(root)
        check_view(root, meta)
        try:
            rows = pq.read_table(root / "rows.parquet").to_pydict()
            texts = pq.read_table(root / "texts.parquet").to_pydict()
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"{root} is a damaged encoder cache ({error}); rebuild it") from error
        rows["path"] = [os.fsdecode(p) for p in rows["path"]]
        captions = {c.decode("utf-8", "surrogatepass"): k
                    for c, k in zip(texts["caption"], texts["key"], strict=True)}
        return cls(root, meta, rows, captions, load_entries(root))

    def __len__(self) -> int:
        return len(self.rows["path"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def check(self, encoders: Any) -> None:
        """Raise ValueError unless this cache was built by these encoders' weights and dtype."""
        want = {"image": encoders.fingerprint("image"), "text": encoders.fingerprint("text")}
        dtype = str(encoders.dtype).removeprefix("torch.")
        if want != self.meta["fingerprints"] or dtype != self.meta["dtype"]:
            raise ValueError(f"{self.root} was built by other encoder weights or dtype "
                             f"({self.meta['model']}, {self.meta['dtype']}): rebuild it")

    def _tensor(self, key: str, name: str) -> torch.Tensor:
        full = f"{key}.{name}"
        if self._resident is not None and full in self._resident:
            return self._resident[full]
        shard = self._entries.get(key)
        if shard is None:
            raise KeyError(f"entry {key[:12]} is not in the cache {self.root} (rebuild it)")
        try:
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = safe_open(str(self.root / "shards" / shard),
                                                          "pt")
            tensor = handle.get_tensor(full)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"shard {shard} of {self.root} is damaged or edited ({error}): "
                             "delete it and rebuild") from error
        return self._checked(tensor, full, shard)

    def _checked(self, t: torch.Tensor, full: str, shard: str) -> torch.Tensor:
        """``t`` if its dtype and rank are what the build wrote (a shard header edited to
        another dtype or shape is refused, naming the shard)."""
        name = full.rsplit(".", 1)[1]
        want = {"latents": (self.meta["dtype"], 3),
                "prompt_embeds": (self.meta.get("text_dtype"), 2),
                "pooled_prompt_embeds": (self.meta.get("text_dtype"), 1),
                "text_length": ("int64", 1),
                # a paired row's entries (encoder_cache.pairs): K latents, a latent-grid mask
                "conditioning_latents": (self.meta["dtype"], 4),
                "loss_mask": ("uint8", 3)}.get(name)
        got = str(t.dtype).removeprefix("torch.")
        if want is None or got != want[0] or t.ndim != want[1]:
            raise ValueError(f"shard {shard} of {self.root} holds {full[:20]}... as {got} "
                             f"{tuple(t.shape)}, not what the build wrote: the shard is "
                             "damaged or edited (delete it and rebuild)")
        return t

    def _stale(self, r: int) -> bool:
        """True when row ``r``'s file is no longer the one encoded: its stored identity
        (path, size, mtime_ns) differs from ``stat`` now (embedded bytes are keyed by their
        hash and cannot change)."""
        identity = json.loads(self.rows["identity"][r])
        if not isinstance(identity[2], int):
            return False
        try:
            st = os.stat(identity[0])
        except OSError:
            return True
        return [int(st.st_size), int(st.st_mtime_ns)] != identity[1:]

    def latents(self, path: str) -> list[torch.Tensor]:
        """Every cached latent of an image (variant-major, unflipped then flipped)."""
        r = self._by_path[path]
        return [self._tensor(k, "latents") for k in self.rows["latent_keys"][r]]

    def latent_sample(
        self, path: str, size_wh: Sequence[int], bucket_wh: Sequence[int],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """The cached sample of an image for one epoch: a flip drawn first with the build's
        ``flip_p`` (as ``BucketResizeCrop`` draws it), then one of the crop variants.
        Raises KeyError when the image (at this size and bucket) is not in the cache."""
        r = self._by_path.get(path)
        rows = self.rows
        if r is None:
            raise KeyError(f"{path} is not in the cache {self.root}")
        bw, bh = (int(v) for v in bucket_wh)
        if (rows["bucket_w"][r], rows["bucket_h"][r]) != (bw, bh) or \
                (rows["width"][r], rows["height"][r]) != tuple(int(v) for v in size_wh):
            raise KeyError(f"{path} is cached for bucket {rows['bucket_w'][r]}x"
                           f"{rows['bucket_h'][r]}, not {bw}x{bh} (rebuild the cache)")
        if self._stale(r):
            raise KeyError(f"{path} changed after the cache was built (size or modification "
                           "time): its latents are stale (rebuild the cache)")
        flip = bool(rng.random() < self.flip_p)
        k = int(rng.integers(self.variants)) if self.variants > 1 else 0
        keys = rows["latent_keys"][r]
        per = len(keys) // len(rows["crop_y"][r])
        key = keys[k * per + (1 if flip and per > 1 else 0)]
        latents = self._tensor(key, "latents")
        factor = self.meta.get("vae_scale_factor")
        if factor and tuple(latents.shape[1:]) != (bh // factor, bw // factor):
            raise ValueError(f"the cached latents of {path} are {tuple(latents.shape)}, not "
                             f"those of a {bw}x{bh} bucket: the shard is damaged or edited "
                             "(rebuild the cache)")
        params = FitParams(
            bucket=(bw, bh), scale=max(bw / size_wh[0], bh / size_wh[1]),
            resized=(rows["resized_w"][r], rows["resized_h"][r]),
            crop=(rows["crop_y"][r][k], rows["crop_x"][r][k], bh, bw), flip=flip,
        )
        return {
            "latents": latents,
            "fit": params,
            "original_size": (rows["height"][r], rows["width"][r]),
            "crop_top_left": params.crop_top_left,
            "target_size": (bh, bw),
            "flipped": flip,
        }

    def has_caption(self, caption: str) -> bool:
        """Whether ``caption``'s embeddings are in the cache."""
        return caption in self._texts

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        """The stored embeddings of a caption: ``prompt_embeds`` [L, D] (L the real token
        count when stored trimmed), ``pooled_prompt_embeds`` and ``text_length``."""
        key = self._texts.get(caption)
        if key is None:
            raise ValueError(
                f"caption {caption[:60]!r} is not in the cache {self.root}: only the captions "
                "of the index (and '') are cached; shuffled or templated captions cannot be "
                "(apply templates to index.captions before building)"
            )
        return {name: self._tensor(key, name)
                for name in ("prompt_embeds", "pooled_prompt_embeds", "text_length")}

    def text_sample(self, caption: str) -> dict[str, Any]:
        """What a sample carries for a caption: the embeddings, and for FLUX the T5
        ``text_length`` and ``t5_attention_mask`` (ones on the real tokens)."""
        out = self.text(caption)
        sample: dict[str, Any] = {"prompt_embeds": out["prompt_embeds"],
                                  "pooled_prompt_embeds": out["pooled_prompt_embeds"]}
        if self.model in TRIMMED_MODELS:
            n = int(out["text_length"][0])
            mask = torch.zeros(out["prompt_embeds"].shape[0], dtype=torch.int64)
            mask[:n] = 1
            sample.update(text_length=n, t5_attention_mask=mask)
        return sample

    def referenced(self) -> set[str]:
        """The entry keys the current view refers to."""
        return {k for keys in self.rows["latent_keys"] for k in keys} | set(self._texts.values())

    def to(self, device: torch.device | str) -> EncoderCache:
        """Keep every entry of the view on ``device`` (a tiny data set on the GPU: batches
        come out there, without a DataLoader worker or a host copy; use ``num_workers=0``)."""
        resident = {}
        for shard, names in self._names_by_shard(self.referenced()).items():
            with safe_open(str(self.root / "shards" / shard), "pt", device=str(device)) as f:
                for name in names:
                    resident[name] = f.get_tensor(name)
        self._resident = resident
        return self

    def _names_by_shard(self, keys: set[str]) -> dict[str, list[str]]:
        """Tensor names of ``keys``, grouped by the shard holding them."""
        wanted: dict[str, set[str]] = {}
        for key in keys:
            if key in self._entries:
                wanted.setdefault(self._entries[key], set()).add(key)
        out: dict[str, list[str]] = {}
        for shard, shard_keys in wanted.items():
            with safe_open(str(self.root / "shards" / shard), "pt") as f:
                names = f.keys()
            out[shard] = [n for n in names if n.rsplit(".", 1)[0] in shard_keys]
        return out

    def nbytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(p.stat().st_size for p in (self.root / "shards").glob("*.safetensors"))

    def prune(self) -> dict[str, int]:
        """Remove entries the current view does not refer to (rewriting mixed shards, one at
        a time, into new shards of at most the shard byte cap); returns the counts of entries
        removed and shards rewritten. Holds the build lock: refused while a build runs."""
        keep = self.referenced()
        by_shard: dict[str, list[str]] = {}
        for key, shard in self._entries.items():
            by_shard.setdefault(shard, []).append(key)
        with build_lock(self.root):
            writer = ShardWriter(self.root / "shards", 1 << 62, 0)
            removed, rewritten, dropped = 0, 0, []
            for shard, keys in sorted(by_shard.items()):
                kept = [k for k in keys if k in keep]
                if len(kept) == len(keys):
                    continue
                removed += len(keys) - len(kept)
                if kept:
                    rewritten += 1
                    self._copy_entries(shard, set(kept), writer)
                dropped.append(shard)
            writer.flush()  # the survivors are safe in new shards before any old one goes
            entries = {k: s for k, s in self._entries.items() if k in keep}
            entries.update(writer.written)
            write_entries(self.root, entries)
            for shard in dropped:
                (self.root / "shards" / shard).unlink(missing_ok=True)
        self._entries, self._handles = entries, {}
        return {"removed": removed, "rewritten": rewritten}

    def _copy_entries(self, shard: str, keys: set[str], writer: ShardWriter) -> None:
        """Add ``keys``' tensors from ``shard`` to ``writer`` entry by entry (it writes a
        shard whenever its entries reach the byte cap)."""
        by_key: dict[str, list[str]] = {}
        for name in self._names_by_shard(keys)[shard]:
            by_key.setdefault(name.rsplit(".", 1)[0], []).append(name)
        with safe_open(str(self.root / "shards" / shard), "pt") as f:
            for key, names in by_key.items():
                writer.add(key, {n.rsplit(".", 1)[1]: f.get_tensor(n) for n in names})
