"""A literal, unoptimised transcription of the specified Automagic_Sinkgd step, one tensor at a
time, written independently of library/automagic_sinkgd.py so the two can be checked against
each other. Clarity over speed: SinkGD is the plain alternating row/column normalisation, the
group statistics concatenate every gradient, every branch reads tensor values on the host.

``stats_lag=True`` models the per-parameter step (kohya's --fused_backward_pass, the optimizer's
``step_param``): gradients arrive one at a time, so the statistics gathered at a refresh step are
used from the next step on, and theta = 1 (neutral) until a first set exists."""

import math

import torch


def sinkgd_alternating(u, iters):
    rows, cols = u.shape
    for _ in range(iters):
        row_norms = u.norm(dim=1, keepdim=True)
        u = torch.where(row_norms > 0, u / row_norms * math.sqrt(cols), torch.zeros_like(u))
        col_norms = u.norm(dim=0, keepdim=True)
        u = torch.where(col_norms > 0, u / col_norms * math.sqrt(rows), torch.zeros_like(u))
    return u


def orthograd_reference(u, w):
    w = w.reshape(u.shape)
    proj = (u * w).sum() / (w * w).sum()
    orth = u - proj * w
    return orth * (u.norm() / orth.norm())


class ReferenceAutomagic:
    def __init__(self, params, lr=1e-5, min_lr=1e-6, max_lr=1e-2, lr_bump=1e-5, eta=2, beta1=0.9,
                 d_coef=2, weight_decay=5e-4, warmup_steps=500, full_finetune=False, orthograd=False,
                 stats_update_freq=5, sinkgd_iters=None, stats_lag=False):
        self.params = list(params)
        self.h = dict(lr=lr, min_lr=min_lr, max_lr=max_lr, lr_bump=lr_bump, eta=eta, beta1=beta1,
                      d_coef=d_coef, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      full_finetune=full_finetune, orthograd=orthograd,
                      stats_update_freq=stats_update_freq)
        self.iters = sinkgd_iters if sinkgd_iters is not None else (5 if full_finetune else 4)
        self.state = {}
        self.group_step = 0
        self.lr_max = lr
        self.stats = None  # (mean, std) of |g| used by this step's decay
        self.stats_lag = stats_lag

    @torch.no_grad()
    def step(self):
        h = self.h
        self.group_step += 1
        self.lr_max = max(self.lr_max, h["lr"])
        grads = [p.grad for p in self.params]
        fresh = None
        if (self.group_step - 1) % h["stats_update_freq"] == 0:
            everything = torch.cat([g.abs().reshape(-1).double() for g in grads])
            fresh = (everything.mean(), everything.std(unbiased=False))
            if not self.stats_lag:
                self.stats = fresh
        self.stats_used = self.stats
        for p in self.params:
            self._step_one(p, p.grad.double())
        if fresh is not None and self.stats_lag:
            self.stats = fresh

    def _step_one(self, p, g):
        h, warm = self.h, self.h["warmup_steps"]
        lora_matrix = p.ndim >= 2 and not h["full_finetune"]
        if p not in self.state:
            w = p.double()
            rows = 1.0 / torch.sqrt(w.reshape(w.shape[0], -1).norm(dim=1) + 1 / h["eta"] ** 2) if lora_matrix else None
            self.state[p] = dict(t=0, m=torch.zeros_like(g), mask=torch.full_like(g, h["lr"]),
                                 avg=h["lr"], avg_max=h["lr"], x0=w.clone(), pol=None, rows=rows)
        s = self.state[p]
        s["t"] += 1
        t = s["t"]
        if t == 1:
            s["m"] = (1 - h["beta1"]) * g
            s["pol"] = g > 0
            return
        w = p.double()
        m_old = s["m"]
        if p.ndim >= 2:
            shape2d = (p.shape[0], -1)
            u = m_old.abs() * torch.sign(g + m_old)
            u = u.reshape(shape2d)
            if h["orthograd"] and t > warm:
                u = orthograd_reference(u, w)
            u = sinkgd_alternating(u, self.iters).reshape(p.shape)
        else:
            u = m_old.abs() * torch.sign(g)
        s["m"] = h["beta1"] * m_old + (1 - h["beta1"]) * g
        first_half = t < warm / 2
        c = None
        if first_half and h["d_coef"] != 1:
            c = float(-(g * (w - s["x0"])).sum())
        if t < warm:
            agree = (g > 0) == s["pol"]
            up = h["lr_bump"] * (h["d_coef"] if first_half and c is not None and c > 0 else 1)
            down = h["lr_bump"] * (h["d_coef"] if first_half and c is not None and c < 0 else 1)
            s["mask"] = torch.where(agree, s["mask"] + up, s["mask"] - down).clamp(h["min_lr"], h["max_lr"])
            s["avg"] = float(s["mask"].mean())
            s["avg_max"] = max(s["avg_max"], s["avg"])
            s["pol"] = g > 0
        factor = 1.0
        if t >= warm:
            if "lr_decay" not in s:
                s["decay_rate"] = (s["avg"] / s["avg_max"]) / warm
                s["lr_decay"] = 1.0
            s["lr_decay"] -= s["decay_rate"]
            factor = max(min(s["lr_decay"], h["lr"] / self.lr_max), 0.1)
        vr = 1.0 / (1.0 + min(3.0 * float((s["m"] ** 2).sum()), 10.0))
        row_scaling = s["rows"]
        eff = s["mask"] * vr * factor
        if row_scaling is not None:
            eff = (eff.reshape(p.shape[0], -1) * row_scaling[:, None]).reshape(p.shape)
        new_w = w
        if first_half and h["weight_decay"] > 0:
            theta = 1.0
            if self.stats is not None:
                mu, sigma = self.stats
                z = (g.abs().mean() - mu) / sigma
                theta = float(2 * torch.sigmoid(4 * z))
            mean_rows = float(row_scaling.mean()) if row_scaling is not None else 1.0
            s["theta"] = theta
            s["decay"] = s["avg"] * mean_rows * vr * theta * h["weight_decay"]  # w *= 1 - decay
            new_w = new_w * (1 - s["decay"])
        new_w = new_w - eff * u
        p.copy_(new_w.to(p.dtype))
