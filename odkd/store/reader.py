"""Reading a store: validate it once, pull its packed arrays into memory, then serve batches by gather.

zarr's own random-index reads decode a chunk per request and run at a few thousand instances/s.
The packed targets are small (a few KB an instance before compression), so the reader reads
each array once, whole shard by whole shard (plain GETs, no byte ranges, so any static HTTP
server works), and answers `get_batch` with a numpy gather.
"""

from __future__ import annotations

import numpy as np

from odkd.errors import OdkdError
from odkd.store.bitpack import unpack_maps
from odkd.store.schema import SCHEMA_VERSION, StoreLayout
from odkd.store.store import open_group, read_attrs, read_markers, storage_errors, store_fs, store_identity

MAP_ARRAYS = ("pt/heatmaps", "st/heatmaps", "st/mask")


def _set_words(record: dict | None) -> str:
    """A keypoint set as a store records it (odkd.data.keypoints.stored_record), in words."""
    if record is None:
        return "'coco' (17 points)"
    return f"'{record.get('name')}' ({record.get('num_keypoints')} points, digest {record.get('digest')})"


class TeacherTargets:
    """The teacher targets of one split, row i being instance i. Open with `TeacherTargets.open(url)`."""

    def __init__(self, url: str, attrs: dict, storage_options: dict | None = None):
        self.url = url
        self.attrs = attrs
        self.layout = StoreLayout.from_dict(attrs["layout"])
        self.storage_options = storage_options
        self._ram: dict[str, np.ndarray] = {}
        self._markers: dict[int, dict] | None = None

    @classmethod
    def open(cls, url: str, *, dataset_fingerprint: str | None = None, split: str | None = None,
             storage_options: dict | None = None, require_complete: bool = True,
             keypoints: dict | None | str = "any") -> "TeacherTargets":
        """Open and validate a store: schema version, split and dataset fingerprint (when given), completeness.

        The split first: a store of another split has another fingerprint too, and "rebuild it" would be
        the wrong advice for a store given in the wrong place."""
        url = str(url).rstrip("/")
        with storage_errors(url):
            attrs = read_attrs(url, storage_options)
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise OdkdError(f"{url}: store schema version {attrs['schema_version']}, this odkd reads "
                            f"version {SCHEMA_VERSION}; rebuild it with odkd cache-teachers")
        stored_split = attrs.get("settings", {}).get("split")
        if split is not None and stored_split != split:
            raise OdkdError(f"{url}: settings.split is {stored_split!r}, but it is read here as the {split!r} "
                            f"split's store; is it the other store of the config?")
        stored_set = attrs.get("settings", {}).get("keypoints")
        if keypoints != "any" and stored_set != keypoints:
            raise OdkdError(f"{url}: built for the keypoint set {_set_words(stored_set)}, but [data] keypoints is "
                            f"{_set_words(keypoints)}; rebuild it for this set")
        stored = attrs.get("settings", {}).get("dataset_fingerprint")
        if dataset_fingerprint is not None and stored != dataset_fingerprint:
            raise OdkdError(f"{url}: built for dataset fingerprint {stored}, but the dataset's is "
                            f"{dataset_fingerprint}; rebuild the cache for this dataset")
        if require_complete and not attrs.get("complete"):
            raise OdkdError(f"{url}: the build is not finished; run odkd cache-teachers again to resume it")
        return cls(url, attrs, storage_options)

    def __len__(self) -> int:
        return self.layout.num_instances

    def markers(self) -> dict[int, dict]:
        """The shards' done-markers (what their writers recorded: rows, digests), read once."""
        if self._markers is None:
            with storage_errors(self.url):
                fs, root = store_fs(self.url, self.storage_options)
                self._markers = read_markers(fs, root, self.layout.num_shards)
        return self._markers

    def identity(self) -> dict:
        """store_identity: URL, dataset and teacher fingerprints, settings and content digests."""
        return store_identity(self.url, self.attrs, self.markers())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.layout.arrays())

    def load(self, names=None) -> "TeacherTargets":
        """Pull the named arrays (all by default) into memory, reading whole shards."""
        wanted = [n for n in (names or self.names) if n not in self._ram]
        unknown = sorted(set(wanted) - set(self.names))
        if unknown:
            raise KeyError(f"{self.url}: no arrays {unknown}; it has {list(self.names)}")
        if wanted:
            group = open_group(self.url, "r", self.storage_options)
            for name in wanted:
                self._ram[name] = group[name][:][: len(self)]
        return self

    def get_batch(self, indices: np.ndarray, names=None) -> dict[str, np.ndarray]:
        """Rows `indices` of the named arrays (all by default), maps still packed."""
        names = tuple(names or self.names)
        self.load(names)
        indices = np.asarray(indices, dtype=np.intp)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.url}: instance indices must lie in [0, {len(self)})")
        return {name: self._ram[name][indices] for name in names}

    def unpack(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same batch with packed maps as bool (B, C, H, W); other arrays pass through."""
        width = self.layout.map_size[0]
        return {name: unpack_maps(values, width) if name in MAP_ARRAYS else values
                for name, values in batch.items()}

    def get_maps(self, indices: np.ndarray, names=None) -> dict[str, np.ndarray]:
        """get_batch, then unpack."""
        return self.unpack(self.get_batch(indices, names))

    def __getstate__(self):
        # a DataLoader worker reloads what it uses rather than receiving every array pickled
        return {**self.__dict__, "_ram": {}}
