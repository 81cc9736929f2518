"""Variance of the ARCO pixel contrast and of its gradient under the NS, SG and SAG pixel samplers, on real data.

For ONE fixed batch and ONE fixed network (student = teacher, no augmentation), the only randomness is the pixel
sampler's draw of anchors and negative keys. Over ``--draws`` independent draws per sampler it records the loss
``L`` and the gradient ``g`` of ``L`` with respect to every trained parameter (network, projection head,
predictor), and reports

* ``Var[L]`` - the quantity of the paper's Thm 3.2 (the loss is an aggregation over pixels);
* ``Var[|g|]`` - the variance of the gradient norm;
* ``tr Cov[g] = E|g - E g|^2`` - the gradient noise that enters SGD's convergence rate (the paper's sigma_g^2),

as ratios against NS, with 95% bootstrap intervals (over draws) for the first two.

Data: the MSD ``Task04_Hippocampus`` folder (raw NIfTI). ``--cases`` volumes (seeded choice) are z-scored,
sliced along the last NIfTI axis (nnU-Net's 2d slicing axis for this dataset), and padded/cropped to 40 x 56
(nnU-Net's 2d patch for it, transposed). Slices with foreground only. The batch is ``--labeled`` slices with
their labels and ``--unlabeled`` slices whose labels are replaced by the network's pseudo-labels, as in training.

Network: nnU-Net's 2d PlainConvUNet layout for this dataset (32-64-128-256 features, strides 1-2-2-2, two convs
per stage, InstanceNorm, LeakyReLU), first trained for ``--train-steps`` steps of cross-entropy on slices of the
other volumes (batch 8, Adam 1e-3; 0 keeps the random initialisation); the projection head and predictor stay at their
initialisation. The entropy cut is alpha_t = 20 (the start of training); the key memory is off, so each draw is
independent.

Run: ``python -m nnunet_contrastive.bench.arco_variance --data .../Task04_Hippocampus`` (measured: 18 minutes on
a 2-core CPU shared with other jobs, most of it the 3 x 100 gradient draws; ``--grad-draws`` and ``--draws`` trade
time for the width of the intervals). The output of that run is in ``docs/results/arco_variance.txt``.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from nnunet_contrastive.components.arco_head import MultiScaleDenseHead
from nnunet_contrastive.components.samplers import build_sampler
from nnunet_contrastive.components.taps import forward_with_taps
from nnunet_contrastive.losses.arco import arco_valid_mask
from nnunet_contrastive.terms.arco import ARCOContrastTerm

__all__ = ["load_slices", "build_network", "measure", "main"]

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..",
                            "shared", "data", "Task04_Hippocampus")
PATCH = (40, 56)


def _fit(a: np.ndarray, size=PATCH) -> np.ndarray:
    """Centre pad (zeros) / crop a 2-D array to ``size``."""
    out = np.zeros(size, dtype=a.dtype)
    src, dst = [], []
    for n, s in zip(a.shape, size):
        if n >= s:
            o = (n - s) // 2
            src.append(slice(o, o + s))
            dst.append(slice(0, s))
        else:
            o = (s - n) // 2
            src.append(slice(0, n))
            dst.append(slice(o, o + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def load_slices(data: str, n_cases: int, seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(images (N, 1, 40, 56) float32, labels (N, 40, 56) int64, case of every slice) of foreground slices."""
    import nibabel as nib

    files = sorted(glob.glob(os.path.join(data, "imagesTr", "*.nii.gz")))
    if not files:
        raise FileNotFoundError(f"no imagesTr/*.nii.gz under {data}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=min(n_cases, len(files)), replace=False))
    xs, ys, cases = [], [], []
    for i in chosen:
        f = files[i]
        img = np.asarray(nib.load(f).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(f.replace("imagesTr", "labelsTr")).dataobj).astype(np.int64)
        img = (img - img.mean()) / max(float(img.std()), 1e-8)
        for z in range(img.shape[2]):
            if (lab[:, :, z] > 0).sum() >= 10:
                xs.append(_fit(img[:, :, z])[None])
                ys.append(_fit(lab[:, :, z]))
                cases.append(os.path.basename(f))
    return np.stack(xs), np.stack(ys), cases


def build_network(num_classes: int = 3) -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 4, (32, 64, 128, 256), torch.nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), num_classes,
                         (2, 2, 2), conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)


def _train(net, x, y, steps: int, batch: int, seed: int) -> Optional[float]:
    if steps <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss = None
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


class _Welford:
    """Running mean and summed squared deviations of a vector (for tr Cov without storing every gradient)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, 0.0

    def add(self, v: torch.Tensor) -> None:
        v = v.double()
        self.n += 1
        if self.mean is None:
            self.mean = v.clone()
            return
        d = v - self.mean
        self.mean += d / self.n
        self.m2 += float((d * (v - self.mean)).sum())

    @property
    def trace_cov(self) -> float:
        return self.m2 / max(1, self.n - 1)


def measure(net, x: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor, samplers=("ns", "sg", "sag"),
            draws: int = 500, grad_draws: int = 100, n_anchors: int = 256, n_keys: int = 256, grid: int = 4,
            seed: int = 0, entropy_percent: float = 20.0, head_seed: int = 0) -> dict:
    """Loss and gradient statistics per sampler for one fixed batch (see the module docstring).

    ``labels``: (B, H, W) ground truth, used on rows with ``labeled``; other rows get the network's argmax.
    Every draw gives a loss; the first ``grad_draws`` draws also a gradient (one backward pass through the network
    each, the expensive part). Returns {sampler: {draws, grad_draws, loss_mean, loss_var, gnorm_mean, gnorm_var,
    grad_trace_cov, losses, gnorms}} and {"sizes": ...}."""
    torch.manual_seed(head_seed)
    head = MultiScaleDenseHead.for_network(net)
    net.eval()  # InstanceNorm has no running stats: eval only matters for dropout/BN, which this network lacks
    with torch.no_grad():
        t = forward_with_taps(net, x)
        prob = torch.softmax(t.logits.float(), 1)
    lab = torch.where(labeled.view(-1, 1, 1), labels, prob.argmax(1))
    valid, _ = arco_valid_mask(lab, labeled, prob, prob, entropy_percent, 0.3)
    s = forward_with_taps(net, x)  # student pass with gradient, reused by every draw (retain_graph)
    results = {"sizes": {"batch_rows": int(x.shape[0]), "labeled_rows": int(labeled.sum()),
                         "valid_pixels_per_class": valid.sum((0, 2, 3)).tolist(), "draws": draws,
                         "anchors_per_class": n_anchors, "keys_per_class": n_keys, "grid": grid,
                         "grad_draws": min(grad_draws, draws),
                         "entropy_percent": entropy_percent}}
    for name in samplers:
        sampler = build_sampler(name) if name == "ns" else build_sampler(name, grid=grid)
        term = ARCOContrastTerm(copy.deepcopy(head), valid.shape[1], sampler, n_anchors=n_anchors, n_keys=n_keys,
                                memory_size=0)
        params = [p for p in list(net.parameters()) + list(term.parameters()) if p.requires_grad]
        zt = term.teacher_embedding(t.decoder, tuple(valid.shape[2:]), term.head)
        gen = torch.Generator().manual_seed(seed)
        wf, losses, gnorms = _Welford(), [], []
        for r in range(draws):
            out, _ = term.contrast(s.decoder, t.decoder, valid, term.head, generator=gen, use_memory=False,
                                   update_memory=False, teacher_map=zt)
            losses.append(float(out.loss.detach()))
            if r < grad_draws:
                grads = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                  for g, p in zip(grads, params)])
                wf.add(flat)
                gnorms.append(float(flat.norm()))
        results[name] = {"draws": draws, "grad_draws": len(gnorms), "loss_mean": float(np.mean(losses)),
                         "loss_var": float(np.var(losses, ddof=1)), "gnorm_mean": float(np.mean(gnorms)),
                         "gnorm_var": float(np.var(gnorms, ddof=1)), "grad_trace_cov": wf.trace_cov,
                         "losses": losses, "gnorms": gnorms}
    return results


def _ratio_ci(a: list, b: list, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """var(a) / var(b) and a 95% percentile-bootstrap interval (independent resampling of the two draw sets)."""
    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    r = np.var(a, ddof=1) / np.var(b, ddof=1)
    ia = rng.integers(0, a.size, (n_boot, a.size))
    ib = rng.integers(0, b.size, (n_boot, b.size))
    with np.errstate(divide="ignore", invalid="ignore"):  # tiny samples can resample to a constant
        boot = np.var(a[ia], axis=1, ddof=1) / np.var(b[ib], axis=1, ddof=1)
    boot = boot[np.isfinite(boot)] if np.isfinite(boot).any() else np.array([np.nan])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(r), float(lo), float(hi)


def report(results: dict) -> str:
    sz = results["sizes"]
    names = [k for k in ("ns", "sg", "sag") if k in results]
    lines = [f"ARCO contrast variance over sampler draws: {sz['draws']} draws per sampler for the loss, the first "
             f"{sz['grad_draws']} of them also for the gradient; one batch of "
             f"{sz['batch_rows']} slices ({sz['labeled_rows']} labeled), {sz['anchors_per_class']} anchors and "
             f"{sz['keys_per_class']} keys per class, grid {sz['grid']}x{sz['grid']}, valid pixels per class "
             f"{sz['valid_pixels_per_class']}",
             f"{'sampler':8s} {'loss mean':>10s} {'Var[L]':>11s} {'|g| mean':>10s} {'Var[|g|]':>11s} "
             f"{'trCov[g]':>11s}"]
    for n in names:
        r = results[n]
        lines.append(f"{n.upper():8s} {r['loss_mean']:10.4f} {r['loss_var']:11.3e} {r['gnorm_mean']:10.4f} "
                     f"{r['gnorm_var']:11.3e} {r['grad_trace_cov']:11.3e}")
    for num, den in (("sg", "ns"), ("sag", "ns"), ("sag", "sg")):
        if num in results and den in results:
            rl = _ratio_ci(results[num]["losses"], results[den]["losses"])
            rg = _ratio_ci(results[num]["gnorms"], results[den]["gnorms"])
            tc = results[num]["grad_trace_cov"] / results[den]["grad_trace_cov"]
            lines.append(f"{num.upper()}/{den.upper()}: Var[L] {rl[0]:.3f} [{rl[1]:.3f}, {rl[2]:.3f}]   "
                         f"Var[|g|] {rg[0]:.3f} [{rg[1]:.3f}, {rg[2]:.3f}]   trCov[g] {tc:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnunet_contrastive.bench.arco_variance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="MSD Task04_Hippocampus folder (imagesTr, labelsTr)")
    ap.add_argument("--cases", type=int, default=12, help="volumes read (seeded choice)")
    ap.add_argument("--labeled", type=int, default=8, help="labeled slices in the measured batch")
    ap.add_argument("--unlabeled", type=int, default=8, help="pseudo-labeled slices in the measured batch")
    ap.add_argument("--draws", type=int, default=500, help="sampler draws per sampler (loss)")
    ap.add_argument("--grad-draws", type=int, default=100,
                    help="of these, draws that also compute the gradient (a backward pass each)")
    ap.add_argument("--anchors", type=int, default=256, help="anchors per class (the trainer's default)")
    ap.add_argument("--keys", type=int, default=256, help="negative keys per class (the trainer's default)")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=100, help="CE steps before measuring (0: initialised)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results (with every draw) to this file")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "imagesTr")):
        print(f"error: no imagesTr under --data {args.data}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    x, y, cases = load_slices(args.data, args.cases, args.seed)
    rng = np.random.default_rng(args.seed)
    # the measured batch: slices of the first volumes; training slices: the remaining volumes
    order = sorted(set(cases))
    n_meas_cases = max(1, len(order) // 3)
    meas = [i for i, c in enumerate(cases) if c in order[:n_meas_cases]]
    train = [i for i, c in enumerate(cases) if c not in order[:n_meas_cases]]
    pick = rng.choice(meas, size=min(len(meas), args.labeled + args.unlabeled), replace=False)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(args.seed)
    net = build_network()
    last = _train(net, xt[train], yt[train], args.train_steps, 8, args.seed)
    xb, yb = xt[pick], yt[pick]
    labeled = torch.arange(len(pick)) < args.labeled
    res = measure(net, xb, yb, labeled, draws=args.draws, grad_draws=args.grad_draws, n_anchors=args.anchors,
                  n_keys=args.keys, grid=args.grid, seed=args.seed)
    res["sizes"].update(cases=len(order), train_slices=len(train), train_steps=args.train_steps,
                        final_train_ce=last, seconds=round(time.time() - t0, 1))
    how = (f"trained {args.train_steps} CE steps (final CE {last:.3f})" if last is not None
           else "initialised (untrained)")
    print(f"network: nnU-Net 2d PlainConvUNet layout, {how} on {len(train)} slices of "
          f"{len(order) - n_meas_cases} volumes; measured batch from {n_meas_cases} other volumes")
    print(report(res))
    print(f"({res['sizes']['seconds']} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
