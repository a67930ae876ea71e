"""Reading a DCP checkpoint without running code from it: checkpoints are untrusted input.

torch.distributed.checkpoint unpickles two things with plain pickle: the `.metadata` file (FileSystemReader)
and every non-tensor value (DefaultLoadPlanner.load_bytes, `torch.load(weights_only=False)`). A crafted file
can make either call any importable function (`os.system` through `__reduce__`). Here `.metadata` goes through
an unpickler that admits only the classes DCP metadata is made of (found by unpickling the metadata of every
layout exatrain writes: single process, FSDP2 dp 2/4, TP 2, pipeline pp2, DeepSpeed ZeRO-3, bf16; all resume
through this reader), and non-tensor values go through
`torch.load(weights_only=True)` (primitives, containers, tensors). Anything else raises CheckpointError before
it is called. Tensor shards DCP already reads with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from exatrain.errors import CheckpointError

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Admits the DCP metadata classes and torch dtypes; refuses every other global by name."""

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source} refers to {module}.{name}, which a DCP checkpoint never contains; "
                              "refusing to load it (a crafted or foreign file: checkpoints are untrusted input)")


def read_metadata(path: str, source: str) -> Metadata:
    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, source).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{source} is corrupt: cannot unpickle it ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by MetadataUnpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = read_metadata(str(path), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"the value of {read_item.dest_index.fqn} is not plain data; refusing to load "
                                  f"it (checkpoints are untrusted input): {str(exc).splitlines()[0]}") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
