"""Experiment 4: memory and gradient flow.

Claim (the paper's account): with plain sliding-window attention the memory objective is
unbounded, with full softmax attention the memory shrinks (each key's weight falls as the
context grows) and its gradients vanish, and GatedFWA's gate keeps both under control.

The models are those of lm_equal_tokens (trained here if it did not run in the same
process). Recorded for every kind and seed:

* per-layer gradient norms (attention and MLP parameters, before clipping) through training;
* the learned gates' retention exp(g) (quantiles over tokens and heads) at each evaluation;
* at initialisation and after training, on held-out windows of the training length, per
  layer and query position t: the attention entropy (nats), the norm of the attention
  output ("memory read") relative to the mean value norm, ||sum_j p_tj v_j|| / mean_j ||v_j||,
  and the attention mass on keys further back than the window;
* gradient reach: the norm of d(loss of the last position) / d(input embedding at
  distance d before it), averaged over windows, by distance.

The attention probabilities are recomputed from each layer's q, k and gates (captured with
forward hooks) and checked against the library's attention output.

    python benchmarks/experiments/memory_gradient_flow.py --quick --out /tmp/exp   # CPU, seconds

Writes memory_gradient_flow.json and memory_gradient_flow.png.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

import kit
import lm
import lm_equal_tokens

from gatedfwa import gated_window_attention
from gatedfwa.train.data import heldout_windows

NAME = "memory_gradient_flow"
CLAIM = ("Sliding-window attention's memory is unbounded and full softmax attention's memory shrinks with "
         "context while its gradients vanish; GatedFWA's gate keeps memory and gradient flow controlled.")


def config(quick: bool) -> dict:
    return {
        "kinds": list(lm_equal_tokens.PAPER_KINDS), "seeds": [0, 1], "lm": lm_equal_tokens.shared_lm(quick),
        "stat_windows": 2 if quick else 4, "reach_windows": 2 if quick else 8,
        "position_bins": 6 if quick else 16, "budget_s": 60,
    }


# --------------------------------------------------------------------------------------
# Attention probabilities of a layer
# --------------------------------------------------------------------------------------


def attention_probabilities(q, k, g, window_size, scale) -> torch.Tensor:
    """p [B, HQ, T, T] float32: row t is the attention distribution of query t, with the
    gate's decay g_{j+1} + ... + g_t added to logit j and keys outside the window masked.
    q [B, T, HQ, D], k [B, T, H, D] (GQA repeats kv heads), g [B, T, HQ] or None."""
    group = q.shape[2] // k.shape[2]
    qh = q.float().transpose(1, 2)
    kh = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if g is not None:
        total = torch.cumsum(g.float().transpose(1, 2), dim=-1)  # [B, HQ, T]
        scores = scores + (total[..., :, None] - total[..., None, :])
    t = torch.arange(q.shape[1], device=q.device)
    distance = t[:, None] - t[None, :]
    visible = distance >= 0
    if window_size is not None:
        visible &= distance < window_size
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def layer_qkvg(layer, x: torch.Tensor):
    """q [B,T,HQ,D], k, v [B,T,H,D] after rotary (positions 0..T-1) and g [B,T,HQ] or None,
    exactly as the layer computes them (its own projection and position encoding)."""
    positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    q, k, v = layer._project(x)
    if layer.token_shift:
        raise NotImplementedError("token_shift layers are not analysed here")
    q, k = layer._position_encode(q, k, positions)
    g = layer.log_gates(x) if layer.use_gate else None
    return q, k, v, g


@torch.no_grad()
def attention_statistics(model, windows: torch.Tensor, device, edges: np.ndarray) -> dict:
    """Per layer, binned by query position: entropy (nats), memory-read norm ratio, and
    the mass beyond the window; plus the largest difference between p @ v and the
    library's attention output (a check of the probabilities)."""
    model.eval()
    window = model.config.window_size
    with lm.AttentionInputs(model) as seen:
        model(windows.to(device))  # float32, so that the check below is tight
    layers, check = [], 0.0
    for layer, x in zip(seen.layers, seen.inputs):
        q, k, v, g = layer_qkvg(layer, x.float())
        p = attention_probabilities(q, k, g, layer.window_size, layer.scale)
        group = q.shape[2] // k.shape[2]
        vh = v.float().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, HQ, T, D]
        read = torch.matmul(p, vh)  # [B, HQ, T, D]
        library = gated_window_attention(q, k, v, g, window_size=layer.window_size, scale=layer.scale)
        check = max(check, float((read.transpose(1, 2) - library.float()).abs().max()))
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, HQ, T]
        read_ratio = read.norm(dim=-1) / vh.norm(dim=-1).mean(dim=-1, keepdim=True)
        t = torch.arange(p.shape[-1], device=p.device)
        far = (t[:, None] - t[None, :]) >= window
        mass_beyond = (p * far).sum(-1)
        per_position = {name: value.mean(dim=(0, 1)).double().cpu().numpy()
                        for name, value in (("entropy", entropy), ("read_norm_ratio", read_ratio), ("mass_beyond_window", mass_beyond))}
        layers.append({name: [float(values[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]
                       for name, values in per_position.items()})
    summary = {name: [float(np.mean(layer[name])) for layer in layers] for name in layers[0]}
    return {"layers": layers, "layer_means": summary, "max_abs_diff_vs_library": check}


def gradient_reach(model, windows: torch.Tensor, device, edges: np.ndarray) -> list[float]:
    """Norm of d(loss at the last position) / d(input embedding) by distance d from that
    position, averaged over windows, binned by ``edges`` over distances 0..T-1."""
    model.eval()
    rows = windows.to(device)
    embeds = model.get_input_embeddings()(rows).detach().requires_grad_()
    with lm.autocast(device):
        logits = model(inputs_embeds=embeds, logits_to_keep=2).logits
    loss = F.cross_entropy(logits[:, 0].float(), rows[:, -1])  # position T-2 predicts token T-1
    (grad,) = torch.autograd.grad(loss, embeds)
    norms = grad.float().norm(dim=-1).mean(dim=0)  # [T]
    by_distance = norms[:-1].flip(0).double().cpu().numpy()  # distance 0 = position T-2
    model.zero_grad(set_to_none=True)
    return [float(by_distance[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]


def centres(edges) -> list[float]:
    edges = np.asarray(edges, dtype=float)
    return np.sqrt(np.maximum(edges[:-1], 0.5) * edges[1:]).tolist()


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    seq_len = config["lm"]["train"]["seq_len"]
    position_edges = kit.log_bins(seq_len, config["position_bins"])
    distance_edges = kit.log_bins(seq_len - 1, config["position_bins"])
    record.results.update(position_bin_edges=position_edges.tolist(), distance_bin_edges=distance_edges.tolist(),
                          window=config["lm"]["model"]["window_size"], seq_len=seq_len)

    def one(arm):
        spec = lm.lm_spec(config["lm"], arm["kind"], arm["seed"], config["device"])
        trained = lm.train_lm(spec)
        windows = heldout_windows(trained.corpus.heldout, seq_len, max(config["stat_windows"], config["reach_windows"]))
        initial = lm.build_model(spec, trained.corpus.vocab_size).to(trained.device)
        out = {"grad_norms": trained.history["grad_norms"], "gates": trained.history["gates"]}
        for label, model in (("init", initial), ("trained", trained.model)):
            out[label] = {
                "attention": attention_statistics(model, windows[:config["stat_windows"]], trained.device, position_edges),
                "gradient_reach": gradient_reach(model, windows[:config["reach_windows"]], trained.device, distance_edges),
            }
        del initial
        return out

    arms = [{"kind": kind, "seed": seed} for seed in config["seeds"] for kind in config["kinds"]]
    kit.run_arms(arms, one, record, deadline, label=lambda a: f"{a['kind']} seed {a['seed']}")
    summary = {}
    for (kind,), arms in kit.group_by(record.arms, "kind").items():
        summary[kind] = {
            f"{stage}_{name}": kit.spread(float(np.mean(a[stage]["attention"]["layer_means"][name])) for a in arms)
            for stage in ("init", "trained") for name in ("entropy", "read_norm_ratio", "mass_beyond_window")
        }
        summary[kind]["final_attention_grad_norm"] = kit.spread(float(np.mean(a["grad_norms"][-1]["attention"])) for a in arms)
        summary[kind]["max_abs_diff_vs_library"] = max(
            max(a[stage]["attention"]["max_abs_diff_vs_library"] for stage in ("init", "trained")) for a in arms)
    record.results["summary"] = summary
    record.save()


def plot(record: kit.Record, png_path) -> None:
    plt = kit.pyplot()
    results = record.results
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (grads, depth, gates), (entropy, read, reach) = axes
    x_pos, x_dist = centres(results["position_bin_edges"]), centres(results["distance_bin_edges"])
    for index, ((kind,), arms) in enumerate(kit.group_by(record.arms, "kind").items()):
        color = kit.kind_color(kind, index)
        steps = [r["step"] for r in arms[0]["grad_norms"]]
        kit.plot_band(grads, steps, [[float(np.mean(r["attention"])) for r in a["grad_norms"]] for a in arms], kind, color)
        layers = range(len(arms[0]["grad_norms"][-1]["attention"]))
        late = lambda a: a["grad_norms"][len(a["grad_norms"]) // 2:]  # second half of training
        kit.plot_band(depth, list(layers), [[float(np.mean([r["attention"][i] for r in late(a)])) for i in layers] for a in arms],
                      kind, color, marker="o")
        if any(layer is not None for layer in arms[0]["gates"][-1]["layers"]):
            gate_steps = [e["step"] for e in arms[0]["gates"]]
            medians = [[float(np.mean([l["retention_quantiles"]["0.5"] for l in e["layers"] if l])) for e in a["gates"]] for a in arms]
            lows = [[float(np.mean([l["retention_quantiles"]["0.05"] for l in e["layers"] if l])) for e in a["gates"]] for a in arms]
            kit.plot_band(gates, gate_steps, medians, f"{kind} median", color, marker="o")
            gates.plot(gate_steps, np.mean(lows, axis=0), color=color, linestyle="--", label=f"{kind} 5% quantile")
        for stage, style in (("trained", "-"), ("init", ":")):
            for ax, name in ((entropy, "entropy"), (read, "read_norm_ratio")):
                curves = [np.mean([layer[name] for layer in a[stage]["attention"]["layers"]], axis=0) for a in arms]
                ax.plot(x_pos, np.mean(curves, axis=0), color=color, linestyle=style,
                        label=f"{kind} ({stage})", marker="o" if stage == "trained" else None, markersize=3)
            reach.plot(x_dist, np.mean([a[stage]["gradient_reach"] for a in arms], axis=0), color=color, linestyle=style,
                       label=f"{kind} ({stage})", marker="o" if stage == "trained" else None, markersize=3)
    grads.set(xlabel="step", ylabel="attention gradient norm (mean over layers)", yscale="log",
              title=f"Gradient norms through training\n{kit.title_note(record)}")
    depth.set(xlabel="layer", ylabel="attention gradient norm (second half of training)", yscale="log",
              title="Gradient norm by depth")
    gates.set(xlabel="step", ylabel="retention exp(g) (mean over layers)", title="Learned gates (gated kinds)")
    entropy.set(xlabel="query position", ylabel="attention entropy (nats, mean over layers, heads)", xscale="log",
                title="Attention entropy (solid: trained, dotted: init)")
    read.set(xlabel="query position", ylabel="||sum_j p_tj v_j|| / mean ||v_j||", xscale="log",
             title="Memory read norm (solid: trained, dotted: init)")
    reach.set(xlabel="distance d from the predicting position", ylabel="||dloss / d embedding||", xscale="log", yscale="log",
              title="Gradient reach (solid: trained, dotted: init)")
    for ax in (entropy, read, reach):
        ax.axvline(results["window"], color="gray", linestyle="--", linewidth=1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    kit.save_figure(fig, record, png_path)


if __name__ == "__main__":
    kit.main(sys.modules[__name__])
