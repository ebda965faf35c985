"""A slow reference that follows DESIGN.md's equations literally, one sample and step at a time.

It reads a model's parameters (converted to float64 by the caller) and never calls seqnorm's own
code, so seqnorm's vectorized paths are checked against an independent transcription.
"""

from __future__ import annotations

import torch


def normalize(v, kind, groups, weight, bias, eps, running, training):
    """Normalize the rows ``v`` ``(M, F)`` of the samples valid at one step (DESIGN.md §1-2)."""
    if kind == "none":
        return v
    if kind in ("layer", "group"):
        g = 1 if kind == "layer" else groups
        size = v.shape[1] // g
        rows = []
        for row in v:
            parts = []
            for k in range(g):
                seg = row[k * size : (k + 1) * size]
                mean = seg.sum() / size
                var = ((seg - mean) ** 2).sum() / size
                parts.append((seg - mean) / torch.sqrt(var + eps))
            rows.append(torch.cat(parts))
        y = torch.stack(rows)
    else:  # batch: per feature over the valid samples, or the step's running statistics
        m = v.shape[0]
        if training and m >= 2:
            mean = v.sum(0) / m
            var = ((v - mean) ** 2).sum(0) / m
        else:
            mean, var = running
        y = (v - mean) / torch.sqrt(var + eps)
    y = y * weight
    return y if bias is None else y + bias


def _norm_args(module, t):
    if module is None:
        return None, None, None
    running = None
    if hasattr(module, "running_mean") and module.running_mean is not None:
        s = min(t, module.running_mean.shape[0] - 1)
        running = (module.running_mean[s], module.running_var[s])
    return module.weight, module.bias, running


def direction(model, suffix, xs, lengths, h0, c0, reverse, training):
    """One direction of one layer. ``xs`` ``(T, N, I)``; returns outputs ``(T, N, H)`` and finals."""
    kind, groups, eps = model.norm, model.groups, model.eps
    lstm = c0 is not None
    p = lambda name: getattr(model, f"{name}{suffix}", None)
    w_ih, w_hh, b_ih, b_hh = p("weight_ih"), p("weight_hh"), p("bias_ih"), p("bias_hh")
    w_hr = p("weight_hr")  # (P, H) with projections: h = w_hr (o * tanh(Nc(c)))
    n_ih, n_hh, n_c = p("norm_ih"), p("norm_hh"), p("norm_c")
    steps, n = xs.shape[:2]
    hid = w_hh.shape[0] // (4 if lstm else 3)
    out_size = w_hh.shape[1]
    h = [h0[i] for i in range(n)]
    c = [c0[i] for i in range(n)] if lstm else None
    out = {}
    for t in range(steps):
        valid = [i for i in range(n) if t < lengths[i]]
        pos = {i: (lengths[i] - 1 - t if reverse else t) for i in valid}
        x = torch.stack([xs[pos[i], i] for i in valid])
        hp = torch.stack([h[i] for i in valid])
        wx, _, rx = _norm_args(n_ih, t)
        wh, _, rh = _norm_args(n_hh, t)
        a = normalize(x @ w_ih.T, kind, groups, wx, None, eps, rx, training)
        b = normalize(hp @ w_hh.T, kind, groups, wh, None, eps, rh, training)
        if lstm:
            gates = a + b
            if b_ih is not None:
                gates = gates + b_ih + b_hh
            i_, f_, g_, o_ = (gates[:, k * hid : (k + 1) * hid] for k in range(4))
            cp = torch.stack([c[i] for i in valid])
            c_new = torch.sigmoid(f_) * cp + torch.sigmoid(i_) * torch.tanh(g_)
            wc, bc, rc = _norm_args(n_c, t)
            h_new = torch.sigmoid(o_) * torch.tanh(
                normalize(c_new, kind, groups, wc, bc, eps, rc, training)
            )
            if w_hr is not None:
                h_new = h_new @ w_hr.T
        else:
            gx = a if b_ih is None else a + b_ih
            gh = b if b_hh is None else b + b_hh
            r = torch.sigmoid(gx[:, :hid] + gh[:, :hid])
            z = torch.sigmoid(gx[:, hid : 2 * hid] + gh[:, hid : 2 * hid])
            nn_ = torch.tanh(gx[:, 2 * hid :] + r * gh[:, 2 * hid :])
            h_new = (1 - z) * nn_ + z * hp
        for j, i in enumerate(valid):
            h[i] = h_new[j]
            if lstm:
                c[i] = c_new[j]
            out[pos[i], i] = h_new[j]
    zero = xs.new_zeros(out_size)
    outputs = torch.stack(
        [torch.stack([out.get((t, i), zero) for i in range(n)]) for t in range(steps)]
    )
    return outputs, torch.stack(h), (torch.stack(c) if lstm else None)


def run(model, x, lengths=None, hx=None, training=True):
    """The reference forward of a seqnorm ``LSTM``/``GRU``: ``x`` ``(T, N, I)`` (not batch-first).

    Returns ``output`` ``(T, N, D*H)``, ``h_n`` and (LSTM) ``c_n``.
    """
    steps, n = x.shape[:2]
    lengths = [steps] * n if lengths is None else [int(v) for v in lengths]
    lstm = type(model).__name__ == "LSTM"
    dirs = 2 if model.bidirectional else 1
    hid = model.hidden_size
    out_size = getattr(model, "proj_size", 0) or hid
    if hx is None:
        zeros = x.new_zeros(model.num_layers * dirs, n, out_size)
        hx = (zeros, x.new_zeros(model.num_layers * dirs, n, hid)) if lstm else zeros
    h0, c0 = hx if lstm else (hx, None)
    layer_input, hs, cs = x, [], []
    for layer in range(model.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            o, h, c = direction(
                model,
                suffix,
                layer_input,
                lengths,
                h0[k],
                None if c0 is None else c0[k],
                d == 1,
                training,
            )
            outs.append(o)
            hs.append(h)
            cs.append(c)
        layer_input = torch.cat(outs, dim=-1)
    return layer_input, torch.stack(hs), (torch.stack(cs) if lstm else None)


def expected_running(module, v_per_step, masks, start=0):
    """Running mean/var of a ``RecurrentBatchNorm`` after one training call, computed literally.

    ``v_per_step[t]`` ``(N, F)``, ``masks[t]`` ``(N,)`` bool. Each step with at least two valid
    samples moves its row (steps past the last row share it, in order) by ``momentum``.
    """
    mean, var = module.running_mean.clone(), module.running_var.clone()
    mom = module.momentum
    for t, (v, m) in enumerate(zip(v_per_step, masks)):
        rows = v[m]
        cnt = rows.shape[0]
        if cnt < 2:
            continue
        s = min(start + t, mean.shape[0] - 1)
        mu = rows.sum(0) / cnt
        mean[s] = (1 - mom) * mean[s] + mom * mu
        var[s] = (1 - mom) * var[s] + mom * ((rows - mu) ** 2).sum(0) / (cnt - 1)
    return mean, var
