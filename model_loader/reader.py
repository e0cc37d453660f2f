"""Read a FlashPack file into one flat tensor per dtype on the target device.

Placeholder implementation (single-threaded preadv into owned CPU memory); the pipelined,
multi-threaded CPU and CUDA paths replace it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .format import PackLayout, element_size, read_layout, storage_dtype


@dataclass
class PackData:
    """A loaded pack: ``blocks[i]`` is the flat tensor of ``layout.blocks[i]`` on the device."""

    layout: PackLayout
    blocks: list[torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view into its block, in file order, with its stored shape."""
        out: dict[str, torch.Tensor] = {}
        for e in self.layout.entries:
            out[e.name] = self.blocks[e.block].narrow(0, e.offset, e.length).view(e.shape)
        return out


def read_pack(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> PackData:
    """Read every block of the pack at ``path`` onto ``device``."""
    path = os.fspath(path)
    layout = read_layout(path)
    device = torch.device(device)
    blocks: list[torch.Tensor] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in layout.blocks:
            raw = torch.empty(b.length_bytes, dtype=torch.uint8)
            view = memoryview(raw.numpy())
            done = 0
            while done < b.length_bytes:
                n = os.preadv(fd, [view[done:]], b.offset_bytes + done)
                if n == 0:
                    raise EOFError(f"{path}: unexpected end of file")
                done += n
            flat = raw.view(storage_dtype(b.dtype)).view(b.dtype) if b.length_elems else torch.empty(0, dtype=b.dtype)
            blocks.append(flat.to(device))
    finally:
        os.close(fd)
    return PackData(layout, blocks)


def load_state_dict(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a FlashPack file, each a view into its dtype's flat block on ``device``."""
    return read_pack(path, device).tensors()
