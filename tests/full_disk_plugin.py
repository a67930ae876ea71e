"""A disk that fills up on one rank only, for the checkpoint tests (`plugins: [full_disk_plugin]`): rank
EXATRAIN_TEST_FULL_RANK gets ENOSPC writing its RNG file of checkpoint step EXATRAIN_TEST_FULL_STEP."""

from __future__ import annotations

import errno
import os

import torch.distributed as dist

from exatrain.train import checkpoint

_real_fsync = checkpoint._fsync_file


def _fsync_file(path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    step = int(os.environ.get("EXATRAIN_TEST_FULL_STEP", "0"))
    if rank == int(os.environ.get("EXATRAIN_TEST_FULL_RANK", "1")) and f"step_{step:08d}.tmp" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _real_fsync(path)


checkpoint._fsync_file = _fsync_file
