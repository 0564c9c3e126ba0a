"""Variable-length (packed) sequences in flash-linear-attention's convention.

``N`` sequences of different lengths travel as one batch row, ``(1, T, ...)`` with ``T`` the sum of their
lengths, and ``cu_seqlens (N + 1,)`` holds their start offsets followed by ``T`` (FlashAttention's API).
Each sequence is scanned on its own, from its own initial state ``initial_state[n]``, and its own final
state comes back: states are ``(N, H, K, V)``.

:class:`PackedSequences` scatters the packed tokens into a zero-padded batch ``(N, L, ...)`` (``L`` the
longest length) so that a batched form runs unchanged, and gathers the outputs back. The padding sits after
each sequence's last token, so a padding token must leave the state as it is (zero keys and values, and a
zero log-decay: the ops fill it so), and each row's final state is then its sequence's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PackedSequences", "scan_packed"]


@dataclass(frozen=True)
class PackedSequences:
    """Where each of the ``T`` packed tokens sits in the padded batch ``(count, longest)``."""

    rows: Tensor  # (T,) the sequence of each token
    columns: Tensor  # (T,) its position within that sequence
    lengths: Tensor  # (count,)
    longest: int

    @property
    def count(self) -> int:
        return int(self.lengths.numel())

    @staticmethod
    def of(cu_seqlens: Tensor, batch: int, length: int) -> "PackedSequences":
        """Check ``cu_seqlens`` against the inputs' ``(batch, T)`` and index the packed tokens.

        Raises:
            TypeError: ``cu_seqlens`` is not a tensor.
            ValueError: a batch other than 1, offsets that are not integers rising from 0 to T.
        """
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"cu_seqlens must be a tensor of (N + 1,) offsets, got {type(cu_seqlens).__name__}")
        if batch != 1:
            raise ValueError(
                f"with cu_seqlens the packed sequences travel in one batch row (B = 1), got B = {batch}; "
                "flatten the batch into the time axis first"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(
                f"cu_seqlens must be (N + 1,) integer offsets, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
            )
        offsets = cu_seqlens.to(device="cpu", dtype=torch.int64)
        lengths = offsets.diff()
        if int(offsets[0]) != 0 or int(offsets[-1]) != length or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {length}, got {offsets.tolist()}")
        rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        columns = torch.arange(length) - offsets[:-1][rows]
        return PackedSequences(rows=rows, columns=columns, lengths=lengths, longest=int(lengths.max()))

    def check_initial_state(self, initial_state: Tensor | None) -> None:
        """One initial state per sequence: ``(N, H, K, V)``."""
        if initial_state is not None and initial_state.shape[0] != self.count:
            raise ValueError(
                f"with cu_seqlens initial_state holds one state per sequence: (N = {self.count}, H, K, V), "
                f"got {tuple(initial_state.shape)}"
            )

    def valid(self, device: torch.device | str | None = None) -> Tensor:
        """``(N, L)`` bool: True at real tokens, False at padding."""
        return torch.arange(self.longest, device=device)[None, :] < self.lengths.to(device)[:, None]

    def pad(self, packed: Tensor, fill: float = 0.0) -> Tensor:
        """``(1, T, ...) -> (N, L, ...)``, padding with ``fill`` (differentiable in ``packed``)."""
        padded = packed.new_full((self.count, self.longest, *packed.shape[2:]), fill)
        rows, columns = self.rows.to(packed.device), self.columns.to(packed.device)
        return padded.index_put((rows, columns), packed[0])

    def unpad(self, padded: Tensor) -> Tensor:
        """``(N, L, ...) -> (1, T, ...)``: the real tokens, in packed order."""
        return padded[self.rows.to(padded.device), self.columns.to(padded.device)][None]


def scan_packed(
    scan: Callable[[list[Tensor], Tensor], tuple[Tensor, Tensor | None]],
    tokens: Sequence[Tensor],
    cu_seqlens: Tensor,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Run a batched ``scan(padded tokens, valid (N, L)) -> (o (N, L, ...), state)`` on the sequences packed
    in ``tokens`` (each ``(1, T, ...)``, zero-padded) and return ``(o (1, T, ...), state)``; ``initial_state``
    must hold one state per sequence (the scan takes it as its batch's)."""
    packed = PackedSequences.of(cu_seqlens, tokens[0].shape[0], tokens[0].shape[1])
    packed.check_initial_state(initial_state)
    o, state = scan([packed.pad(t) for t in tokens], packed.valid(tokens[0].device))
    return packed.unpad(o), state
