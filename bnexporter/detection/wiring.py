"""The records that say how a BN's input is computed: shared by the link finder
(which reads names, shapes and graphs) and the refinement (which is pure math)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feed:
    """What a producer reads, channel by channel.

    ``op`` is ``bn`` (the output of BN layer ``bn``), ``relu`` / ``relu6`` (the
    activation of ``args[0]``), ``add`` (the sum of ``args``) or ``maxpool``
    (a max over a window of ``args[0]``: keeps the range, not the moments).
    """

    op: str
    bn: str | None = None
    args: tuple[Feed, ...] = ()

    def bns(self) -> set[str]:
        """Every BN this feed reads (to order the refinement upstream first)."""
        out = {self.bn} if self.bn else set()
        for a in self.args:
            out |= a.bns()
        return out


@dataclass(frozen=True)
class Link:
    """The producer of one BN's input.

    ``layout`` says how to read the kernel: ``keras`` (..., in, out), ``keras_dw``
    (kh, kw, in, multiplier), ``torch`` (out, in / groups, ...). ``groups`` is
    the conv's group count (0 when unknown: then no feed is used).
    """

    bn: str
    kernel: str
    layout: str
    groups: int
    bias: str | None = None
    feed: Feed | None = None
