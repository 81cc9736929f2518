"""Loss terms of ARCO (You et al., NeurIPS 2023): the sampled pixel contrast and the confidence-weighted
pseudo-label cross-entropy, on the staged framework.

:class:`ARCOContrastTerm` (``uses_teacher``; its ``head`` is an ``ema_heads`` entry, so the teacher holds an EMA
copy of it): the student's view 1 and the EMA teacher's view 2 (same spatial transform, independent intensity
augmentation) of the rows it is given; labels = ground truth on labeled rows, the teacher's argmax on unlabeled
rows; anchor-valid pixels by :func:`~nnunet_contrastive.losses.arco.arco_valid_mask` (delta_p = 0.3, student
entropy below the alpha_t-th percentile, alpha_t = 20 (1 - t) over the stage); anchors and negative keys drawn by
the pixel sampler (SG by default) over the whole batch; loss :func:`~nnunet_contrastive.losses.arco.arco_contrast`.
The student embedding is computed only at the sampled anchor pixels (``MultiScaleDenseHead.at``), the teacher's for
the whole image without gradient (class means need every valid pixel). The keys of this batch are pushed into a
per-class memory (:class:`~nnunet_contrastive.losses.arco.ClassKeyMemory`) after the loss is computed, so later
batches see them as negatives too.

Not reproduced from the authors' code (methods.md §D): the always-empty memory bank (see the loss module), the
gradient-free nearest-neighbour loss L_nn (it has no gradient path, so it never changed a weight), the unused
``LocalConLoss``; the predictor is one linear map instead of two linear maps in a row (the same function class).

:class:`ARCOPseudoLabelTerm` (L_unsup): cross-entropy of the student (view 1) against the teacher's argmax
(view 2) on unlabeled rows, each row weighted by the fraction of its pixels where the teacher's confidence is at
least ``threshold`` (0.97), as the authors' code. The authors average only over pixels with CE > 0 (in floating
point that is almost every pixel); here the mean runs over all pixels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_contrastive.components.arco_head import MultiScaleDenseHead
from nnunet_contrastive.components.samplers import PixelSampler, SGSampler
from nnunet_contrastive.losses.arco import (ARCO_TEMPERATURE, ARCOOutput, ClassKeyMemory, arco_contrast,
                                            arco_valid_mask, class_means, entropy_percent_at)
from nnunet_contrastive.terms.base import LossTerm

__all__ = ["ARCOContrastTerm", "ARCOPseudoLabelTerm", "arco_labels"]


def arco_labels(ctx, rows: str, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, *S) long, labeled (B,) bool) of ``rows``: ground truth on labeled rows, teacher argmax else."""
    idx = ctx.rows(rows)
    labeled = ctx.labeled.to(teacher_logits.device)
    labeled = labeled if idx is None else labeled[idx]
    pseudo = teacher_logits.argmax(1)
    if not bool(labeled.any()):
        return pseudo, labeled
    target = ctx.target(rows)
    target = target[0] if isinstance(target, (list, tuple)) else target
    target = target[:, 0].long()
    return torch.where(labeled.view(-1, *([1] * (pseudo.dim() - 1))), target, pseudo), labeled


class ARCOContrastTerm(LossTerm):
    """Args: head (MultiScaleDenseHead), num_classes (output channels, background included), sampler (default
    SG, 4 cells per axis), n_anchors / n_keys (per class over the batch), memory_size (keys per class; 0: none),
    temperature (0.5), prob_threshold (delta_p, 0.3), entropy_percent (alpha_t at the stage start and end:
    20 -> 0), predictor (a student-only linear map on the embedding, identity-initialised)."""

    uses_teacher = True
    ema_heads = ("head",)

    def __init__(self, head: MultiScaleDenseHead, num_classes: int, sampler: Optional[PixelSampler] = None,
                 n_anchors: int = 256, n_keys: int = 256, memory_size: int = 1024,
                 temperature: float = ARCO_TEMPERATURE, prob_threshold: float = 0.3,
                 entropy_percent: tuple = (20.0, 0.0), predictor: bool = True):
        super().__init__()
        self.head = head
        self.num_classes = int(num_classes)
        self.sampler = sampler if sampler is not None else SGSampler(grid=4)
        self.n_anchors, self.n_keys = int(n_anchors), int(n_keys)
        self.temperature, self.prob_threshold = float(temperature), float(prob_threshold)
        self.entropy_percent = tuple(float(x) for x in entropy_percent)
        self.predictor = None
        if predictor:
            self.predictor = nn.Linear(head.out_dim, head.out_dim, bias=False)
            with torch.no_grad():
                self.predictor.weight.copy_(torch.eye(head.out_dim))
        self.memory = ClassKeyMemory(self.num_classes, head.out_dim, memory_size)
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[dict] = None  # loaded from a checkpoint, applied at the next draw

    # ------------------------------------------------------------------ the sampler's own RNG, checkpointed
    def sampler_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the pixel sampler during training, on ``device``. Seeded once from torch's global RNG
        (so a seeded run is repeatable), then independent of it; its state is part of the term's state_dict
        (``get_extra_state``), so ``--c`` continues the very same draws."""
        device = torch.device(device)
        if self._generator is None or self._generator.device.type != device.type:
            g = torch.Generator(device=device)
            pending, self._generator_state = self._generator_state, None
            if pending is not None and pending["device"] == device.type:
                g.set_state(pending["state"].cpu())
            else:  # fresh start, or a checkpoint of another device type (a CPU state cannot seed a CUDA generator)
                g.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
            self._generator = g
        return self._generator

    def get_extra_state(self):
        if self._generator is not None:
            return {"device": self._generator.device.type, "state": self._generator.get_state()}
        return self._generator_state

    def set_extra_state(self, state) -> None:
        self._generator, self._generator_state = None, state

    # ------------------------------------------------------------------ the loss on given maps
    def contrast(self, student_decoder: list, teacher_decoder: list, valid: torch.Tensor, teacher_head: nn.Module,
                 generator: Optional[torch.Generator] = None, use_memory: bool = True,
                 update_memory: bool = True, teacher_map: Optional[torch.Tensor] = None) -> tuple[ARCOOutput, dict]:
        """The ARCO loss for decoder taps of the student and the teacher and the anchor-valid mask ``valid``
        (``(B, K, *S)``). ``teacher_head``: the EMA copy of ``head`` (or ``head`` itself, e.g. in measurements);
        ``teacher_map``: the teacher embedding if already computed (:meth:`teacher_embedding`), e.g. when the same
        batch is sampled many times."""
        size = tuple(valid.shape[2:])
        K = valid.shape[1]
        zt = self.teacher_embedding(teacher_decoder, size, teacher_head) if teacher_map is None else teacher_map
        with torch.no_grad():
            means, counts = class_means(zt, valid)
            ks = self.sampler(valid, self.n_keys, generator=generator, pool_batch=True)
            keys = ks.gather(zt)[0]  # (K, n_keys, D)
            key_mask = ks.mask[0]
        a = self.sampler(valid, self.n_anchors, generator=generator, pool_batch=True)
        za = self.head.at(self.head.select(student_decoder), size, a.index[0].reshape(-1))
        if self.predictor is not None:
            za = self.predictor(za)
        anchors = za.reshape(K, self.n_anchors, -1)
        key_cls = torch.arange(K, device=keys.device).unsqueeze(1).expand_as(key_mask)
        all_keys, all_cls = keys[key_mask], key_cls[key_mask]
        if use_memory:
            mem_keys, mem_cls = self.memory.contents()
            all_keys = torch.cat([all_keys, mem_keys.to(all_keys.dtype)])
            all_cls = torch.cat([all_cls, mem_cls])
        out = arco_contrast(anchors, a.mask[0], means, counts > 0, all_keys, all_cls, self.temperature)
        if update_memory:
            self.memory.push(keys, key_mask)
        stats = {"anchors": a.count[0].sum(), "negatives_per_anchor": (all_cls.numel() / max(1, K)),
                 "classes_used": out.used.sum()}
        return out, stats

    @staticmethod
    @torch.no_grad()
    def teacher_embedding(teacher_decoder: list, size: tuple, teacher_head: nn.Module) -> torch.Tensor:
        """The teacher's embedding map ``(B, D, *size)`` (float32, no gradient)."""
        th = getattr(teacher_head, "module", teacher_head)
        return th(th.select(teacher_decoder), size).float()

    # ------------------------------------------------------------------ the term
    def forward(self, ctx, rows: str = "all"):
        if ctx.num_rows(rows) == 0:
            return None
        s = ctx.forward("student", 0, rows)
        t = ctx.forward("teacher", 1, rows)
        with torch.no_grad():
            t_prob = torch.softmax(t.logits.float(), 1)
            s_prob = torch.softmax(s.logits.detach().float(), 1)
            labels, labeled = arco_labels(ctx, rows, t.logits)
            pct = entropy_percent_at(ctx.progress, *self.entropy_percent)
            valid, vstats = arco_valid_mask(labels, labeled, t_prob, s_prob, pct, self.prob_threshold)
        out, stats = self.contrast(s.decoder, t.decoder, valid, ctx.trainer.teacher_head(self.name, "head"),
                                   generator=self.sampler_generator(valid.device), update_memory=self.training)
        named = {f"{self.name}_{k}": (v.detach() if torch.is_tensor(v) else v) for k, v in {**stats, **vstats}.items()}
        named[f"{self.name}_entropy_percent"] = pct
        return out.loss, named


class ARCOPseudoLabelTerm(LossTerm):
    """L_unsup: confidence-weighted pseudo-label CE from the EMA teacher (view 2) to the student (view 1)."""

    uses_teacher = True

    def __init__(self, threshold: float = 0.97):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, ctx, rows: str = "unlabeled"):
        if ctx.num_rows(rows) == 0:
            return None
        s = ctx.forward("student", 0, rows).logits
        with torch.no_grad():
            p = torch.softmax(ctx.forward("teacher", 1, rows).logits.float(), 1)
            conf, pseudo = p.max(1)
            w = (conf >= self.threshold).float().flatten(1).mean(1)  # (B,)
        ce = F.cross_entropy(s.float(), pseudo, reduction="none")  # (B, *S)
        loss = (w.view(-1, *([1] * (ce.dim() - 1))) * ce).mean()
        return loss, {f"{self.name}_confident_fraction": w.mean()}
