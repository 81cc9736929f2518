"""The step context: one training batch, and the student's and teacher's forward passes cached per view and rows.

Terms never call the network themselves; they ask the context::

    f = ctx.forward("student", view=0)                  # Features: skips, decoder taps, outputs
    t = ctx.forward("teacher", view=1, rows="unlabeled")
    z = f.bottleneck ; d = f.decoder[-1] ; logits = f.logits

A pass is computed once per (model, view, rows) and step; a request for a row subset is served from a cached
pass over all rows, and a full pass reuses a cached encoder-only pass (the decoder runs on its skips). So two terms
that need the same features cost one forward pass. The teacher runs without gradients.

Student flips (``Stage.flip_student``): the student's view-0 input is flipped along a random subset of its spatial
axes (one draw per step from the trainer's generator); every output and tap is flipped back, so all terms see
features in the frame of the unflipped input.
"""
from __future__ import annotations

from typing import Optional

import torch

from nnunet_contrastive.components.taps import Features, forward_with_taps
from nnunet_contrastive.components.teacher import flip_batch, random_flip

__all__ = ["StepContext"]

_VIEW_KEYS = ("data", "data_view2")


class StepContext:
    """Per-iteration cache. ``batch``: the loader's batch (tensors on any device); ``student``: the plain network
    (unwrapped); ``teacher``: the teacher's network copy or None; ``flip_generator``: CPU generator, or None for
    no student flip; ``progress``: fractional progress in the stage; ``training_progress``: fractional progress
    through the stages after the pre-training (StagePlan.training_progress; default: ``progress``)."""

    def __init__(self, batch: dict, device: torch.device, student, teacher=None,
                 flip_generator: Optional[torch.Generator] = None, progress: float = 0.0, stage=None, trainer=None,
                 training_progress: Optional[float] = None):
        self.batch, self.device, self.student, self.teacher = batch, device, student, teacher
        self.flip_generator, self.progress, self.stage, self.trainer = flip_generator, progress, stage, trainer
        self.training_progress = progress if training_progress is None else training_progress
        self._inputs: dict = {}
        self._cache: dict = {}
        self._flip_dims = None
        self.forward_calls = 0  # encoder passes actually run (tests, diagnostics)
        labeled = batch.get("labeled")
        n = batch["data"].shape[0]
        labeled = torch.ones(n, dtype=torch.bool) if labeled is None else torch.as_tensor(labeled).bool()
        self.labeled = labeled
        self._rows = {"labeled": torch.nonzero(labeled).flatten().to(device),
                      "unlabeled": torch.nonzero(~labeled).flatten().to(device)}

    # ------------------------------------------------------------------ batch pieces
    def rows(self, which: str) -> Optional[torch.Tensor]:
        """Row indices (on the device) of "labeled" / "unlabeled" rows; None for "all"."""
        return None if which == "all" else self._rows[which]

    def num_rows(self, which: str) -> int:
        return int(self.batch["data"].shape[0]) if which == "all" else int(self._rows[which].numel())

    def input(self, view: int = 0) -> torch.Tensor:
        if view not in self._inputs:
            key = _VIEW_KEYS[view]
            if key not in self.batch:
                raise KeyError(f"the batch has no view {view + 1} ('{key}'): the stage's LoaderSpec must ask for "
                               f"views=2")
            self._inputs[view] = self.batch[key].to(self.device, non_blocking=True)
        return self._inputs[view]

    def target(self, rows: str = "labeled"):
        t = self.batch["target"]
        idx = self.rows(rows)
        if isinstance(t, (list, tuple)):
            t = [x.to(self.device, non_blocking=True) for x in t]
            return t if idx is None else [x[idx] for x in t]
        t = t.to(self.device, non_blocking=True)
        return t if idx is None else t[idx]

    def labels(self, rows: str = "all") -> Optional[torch.Tensor]:
        """(N, M) meta-label ids of the active meta-labels (the loader's ``contrastive_labels``), or None."""
        lab = self.batch.get("contrastive_labels")
        if lab is None or lab.shape[1] == 0:
            return None
        lab = lab.to(self.device)
        idx = self.rows(rows)
        return lab if idx is None else lab[idx]

    # ------------------------------------------------------------------ forward passes
    def _flips(self, x: torch.Tensor) -> tuple:
        if self._flip_dims is None:
            _, self._flip_dims = random_flip(x[:1], generator=self.flip_generator)
        return self._flip_dims

    def _network(self, who: str):
        """The student's or the teacher's network; a clear error for any other name or a missing teacher."""
        if who not in ("student", "teacher"):
            raise ValueError(f"who must be 'student' or 'teacher', got {who!r}")
        net = self.student if who == "student" else self.teacher
        if net is None:
            raise ValueError("this trainer has no teacher: a term asked for a teacher pass")
        return net

    def _run(self, who: str, view: int, idx: Optional[torch.Tensor], encoder_only: bool,
             skips: Optional[list] = None) -> Features:
        net = self._network(who)
        x = self.input(view)
        x = x if idx is None else x[idx]
        dims = self._flips(x) if (who == "student" and view == 0 and self.flip_generator is not None) else ()
        if skips is None:
            self.forward_calls += 1
        with torch.set_grad_enabled(who == "student" and torch.is_grad_enabled()):
            if skips is not None and dims:
                skips = [flip_batch(s, dims) for s in skips]  # back into the network's (flipped) frame
            f = forward_with_taps(net, flip_batch(x, dims) if dims else x, skips=skips, encoder_only=encoder_only)
        return f.map(lambda t: flip_batch(t, dims)) if dims else f

    def forward(self, who: str = "student", view: int = 0, rows: str = "all", encoder_only: bool = False
                ) -> Features:
        """Features of ``who`` ("student" / "teacher") on ``view`` (0 or 1) for ``rows``; cached per step."""
        self._network(who)
        for key in ((who, view, rows), (who, view, "all")):
            hit = self._cache.get(key)
            if hit is not None and (encoder_only or hit.full):
                return hit if key[2] == rows else hit.select(self.rows(rows))
        idx = self.rows(rows)
        partial = self._cache.get((who, view, rows))
        if partial is not None:  # encoder-only pass cached, a full pass wanted: run only the decoder
            f = self._run(who, view, idx, encoder_only=False, skips=partial.skips)
        else:
            f = self._run(who, view, idx, encoder_only)
        self._cache[(who, view, rows)] = f
        return f

    def forward_input(self, who: str, x: torch.Tensor) -> Features:
        """Features of ``who`` on an input a term built itself (e.g. CutMix's pasted rows): one pass, not cached,
        never flipped; the teacher's without gradients."""
        net = self._network(who)
        self.forward_calls += 1
        with torch.set_grad_enabled(who == "student" and torch.is_grad_enabled()):
            return forward_with_taps(net, x)

    def forward_views(self, who: str = "student", views: tuple = (0, 1), rows: str = "all",
                      encoder_only: bool = False) -> tuple:
        """``forward`` for several views at once: the views' rows are concatenated into ONE pass (fewer, larger
        convolutions; on a CPU two passes of N rows cost clearly more than one of 2N), then split and cached per
        view. Equal to separate passes for nnU-Net's instance-normalised networks. Views the student sees flipped
        (``Stage.flip_student``) or already cached are served by ``forward``."""
        net = self._network(who)
        flipped = who == "student" and self.flip_generator is not None and 0 in views
        cached = any(self._cache.get((who, v, r)) is not None for v in views for r in (rows, "all"))
        if flipped or cached or len(views) < 2:
            return tuple(self.forward(who, v, rows, encoder_only) for v in views)
        idx = self.rows(rows)
        xs = [self.input(v) if idx is None else self.input(v)[idx] for v in views]
        self.forward_calls += 1
        with torch.set_grad_enabled(who == "student" and torch.is_grad_enabled()):
            f = forward_with_taps(net, torch.cat(xs), encoder_only=encoder_only)
        out, start = [], 0
        for v, x in zip(views, xs):
            a, b = start, start + x.shape[0]
            part = f.map(lambda t, a=a, b=b: t[a:b])
            self._cache[(who, v, rows)] = part
            out.append(part)
            start = b
        return tuple(out)
