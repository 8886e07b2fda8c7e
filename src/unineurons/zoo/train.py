"""Train one seed of a zoo: a GPT-2 from scratch, with checkpoints and exact resume.

Everything random is a function of the seed: the initial weights (``torch.manual_seed(seed)``
before the model is built) and the data order (:func:`batch_rows`: a seeded permutation of the
token store per epoch, so the rows of step ``s`` depend on ``(seed, s)`` only). Dropout is off,
so no randomness is drawn while training. Training runs with one CPU thread, so results do not
depend on how many seeds run side by side (thread count can change float summation order).
With ``ZooSpec.device`` a GPU (``zoo train --device cuda``) the model, AdamW state and batches
live there; checkpoints and resume states are saved from CPU copies.

On disk, per seed::

    seed{S}/
      metrics.jsonl            one JSON row every log_every steps and at each checkpoint:
                                 step, tokens (seen so far = step x batch x ctx),
                                 train_loss (mean over the steps since the last row),
                                 heldout_loss (every eval_every steps and at checkpoints),
                                 lr (of the last step), elapsed_s (wall time on this seed,
                                 all runs, evals and checkpoints included), tokens_per_s
                                 (training steps only, since the last row)
      step{N}/                 HF checkpoint: config.json, model.safetensors, tokenizer files,
                               zoo_checkpoint.json (seed, step, losses)
      resume/state.json        the last checkpoint's step, AdamW hyper-parameters, elapsed
                               time, metrics.jsonl length and a fingerprint of the settings
      resume/state-step{N}.safetensors   weights, AdamW moments and torch RNG state (no pickle)

``state.json`` is written last (atomically), so it always names a complete state: a process
killed anywhere resumes from the last checkpoint and ends bitwise-equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnineuronsError
from ..io import load_tensors, read_json, save_tensors, write_json
from .config import ZooConfig, lr_at, member_name, member_seeds

__all__ = ["ZooSpec", "build_model", "batch_rows", "train_seed", "seed_dir", "RESUME_FORMAT"]

#: Bumped when the resume state's layout changes; an older state is refused, not misread.
RESUME_FORMAT = 1


@dataclass(frozen=True)
class ZooSpec:
    """Everything a worker needs to train any seed of one zoo (picklable, for spawn)."""

    config: ZooConfig
    steps: int  #: optimizer steps per seed
    checkpoints: tuple[int, ...]  #: sorted steps to save; always ends with ``steps``
    out: str  #: the zoo folder
    tokens: str  #: training token store folder
    heldout: str | None  #: held-out token store folder (None: no held-out loss)
    tokenizer: str  #: tokenizer folder (from the token store's manifest)
    vocab_size: int  #: model vocabulary = the tokenizer's
    n_positions: int  #: model positions = the token store's ctx
    ctx: int  #: training context length (<= n_positions)
    special: dict[str, Any] = field(default_factory=dict)  #: bos_id, eos_id, pad_id
    fingerprint: str = ""  #: hash of the settings; a resume state from other settings is refused
    #: torch device of the model, optimizer state and batches (cpu, cuda, cuda:i); checkpoints
    #: and resume states are saved from CPU copies. Not in the fingerprint: a seed may resume
    #: on another device (bitwise equality holds on one device only).
    device: str = "cpu"


def seed_dir(out: str | os.PathLike, seed: int) -> Path:
    """The folder of one seed in a zoo (``seed{S}``; a grid member's ``init{I}-data{D}``)."""
    return Path(out) / member_name(seed)


def build_model(spec: ZooSpec, seed: int) -> torch.nn.Module:
    """A freshly initialised GPT-2 for ``seed`` (dropout off, gelu_new, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = spec.config
    config = GPT2Config(
        vocab_size=spec.vocab_size, n_positions=spec.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
        activation_function="gelu_new",
        # No dropout: runs stay deterministic and resumable without RNG bookkeeping, and at
        # this scale (far under one epoch of data) dropout only slows learning.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=spec.special.get("bos_id"), eos_token_id=spec.special.get("eos_id"),
        pad_token_id=spec.special.get("pad_id"),
    )
    torch.manual_seed(member_seeds(seed)[0])  # a grid member's init seed
    model = GPT2LMHeadModel(config)
    return model


def _optimizer(model: torch.nn.Module, cfg: ZooConfig, device: str = "cpu") -> torch.optim.AdamW:
    # Decay matrices (and the embeddings), not biases or LayerNorm gains: the usual GPT recipe.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # On CPU foreach=False: the plain per-tensor loop (foreach and fused were no faster there,
    # within the noise of benchmarks/zoo_speed.py); pinning it keeps the arithmetic (hence
    # resumed weights, also of zoos begun by earlier versions) identical whatever torch's
    # default becomes. On a GPU the per-tensor loop is launch-bound: the fused kernel there
    # (deterministic too, so resumes stay bitwise).
    if device == "cpu":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 foreach=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True)


class _Order:
    """The data order of one seed: step ``s`` reads rows ``batch_rows(seed, s, ...)``."""

    def __init__(self, seed: int, n_rows: int, batch_size: int):
        self.seed, self.n, self.b = seed, n_rows, batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            # A fresh generator per (seed, epoch): no state to carry across a resume.
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def rows(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.b, (step + 1) * self.b, dtype=np.int64)
        out = np.empty(self.b, dtype=np.int64)
        for epoch in np.unique(pos // self.n):  # a batch can straddle an epoch boundary
            sel = pos // self.n == epoch
            out[sel] = self.perm(int(epoch))[pos[sel] % self.n]
        return out


def batch_rows(seed: int, step: int, n_rows: int, batch_size: int) -> np.ndarray:
    """Token-store rows of step ``step`` (0-based) for ``seed``: a pure function."""
    return _Order(seed, n_rows, batch_size).rows(step)


def _lm_loss(model: torch.nn.Module, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions 1..T-1 of ``x`` [B, T]."""
    h = model.transformer(input_ids=x).last_hidden_state[:, :-1]  # (B, T-1, d_model)
    logits = model.lm_head(h)  # (B, T-1, vocab): the last position predicts nothing we have
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           x[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        total += float(_lm_loss(model, xb, reduction="sum"))
        count += xb.shape[0] * (xb.shape[1] - 1)
    model.train()
    return total / count


# ---- resume state ------------------------------------------------------------------------

def _save_state(sdir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                extra: dict[str, Any]) -> None:
    """Weights + AdamW state as safetensors, then state.json (the commit point)."""
    rdir = sdir / "resume"
    rdir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    # named_parameters lists a tied weight once (safetensors refuses shared storage).
    for name, p in model.named_parameters():
        tensors[f"model.{name}"] = p.detach().cpu()
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(val).cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    fname = f"state-step{step}.safetensors"
    save_tensors(rdir / fname, tensors, metadata={"format": str(RESUME_FORMAT)})
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in sd["param_groups"]]
    write_json(rdir / "state.json", {"format": RESUME_FORMAT, "step": step, "file": fname,
                                     "param_groups": groups, **extra})
    for old in rdir.glob("state-step*.safetensors"):  # earlier states are superseded now
        if old.name != fname:
            old.unlink(missing_ok=True)


def _load_state(sdir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                fingerprint: str) -> dict | None:
    """Restore the last checkpoint's state into ``model`` and ``opt``; None if there is none."""
    path = sdir / "resume" / "state.json"
    if not path.is_file():
        return None
    try:
        return _restore(path, sdir, model, opt, fingerprint)
    except (UnineuronsError, KeyError, ValueError, TypeError, RuntimeError) as e:
        if isinstance(e, UnineuronsError) and "delete " + str(sdir) in str(e):
            raise  # an older format or other settings: its own message
        raise UnineuronsError(
            f"the resume state in {sdir / 'resume'} is damaged ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); delete the folder "
            f"{sdir / 'resume'} and rerun: that seed trains again from step 0"
        ) from None


def _restore(path: Path, sdir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
             fingerprint: str) -> dict:
    """:func:`_load_state` on an existing ``resume/state.json``."""
    state = read_json(path, "resume state")
    if state.get("format") != RESUME_FORMAT:
        raise UnineuronsError(
            f"resume state {path} has format {state.get('format')}, this unineurons reads "
            f"{RESUME_FORMAT}; delete {sdir} to retrain this seed"
        )
    if state.get("fingerprint") != fingerprint:
        raise UnineuronsError(
            f"resume state {path} was saved under other zoo settings than zoo.json's; "
            f"delete {sdir} to retrain this seed"
        )
    tensors, _ = load_tensors(sdir / "resume" / state["file"], "resume state")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _save_checkpoint(sdir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                     info: dict[str, Any]) -> Path:
    """HF folder ``step{N}``, written beside and renamed into place (never half-written)."""
    final = sdir / f"step{step}"
    tmp = sdir / f".step{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    if next(model.parameters()).device.type != "cpu":  # HF folders hold CPU tensors
        import copy

        model = copy.deepcopy(model).to("cpu")  # .to keeps the tied embeddings tied
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint is noise
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "zoo_checkpoint.json", info)
        if final.exists():  # left by a run killed after it but before its resume state
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    return final


# ---- the loop ----------------------------------------------------------------------------

def train_seed(spec: ZooSpec, seed: int, tokenizer: Any = None,
               report: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) seed ``seed`` of the zoo described by ``spec``; return its summary.

    ``report(n)`` is called after every step with the number of steps just done (for progress
    bars); at the start it gets the steps already done by an earlier run.
    """
    from ..models.load import load_tokenizer
    from ..tokens import TokenStore

    cfg = spec.config
    sdir = seed_dir(spec.out, seed)
    sdir.mkdir(parents=True, exist_ok=True)
    metrics = sdir / "metrics.jsonl"
    store = TokenStore.open(spec.tokens, verify=False)  # the parent verified it once
    data = store.tokens  # [n_contexts, store ctx] memmap
    held = None
    if spec.heldout is not None:
        hs = TokenStore.open(spec.heldout, verify=False)
        m = min(cfg.eval_contexts, hs.n_contexts)
        held = torch.from_numpy(np.asarray(hs.tokens[:m, :spec.ctx], dtype=np.int64)).to(
            spec.device)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer)

    model = build_model(spec, seed).to(spec.device)  # initialised on CPU: same weights anywhere
    model.train()
    opt = _optimizer(model, cfg, spec.device)
    state = _load_state(sdir, model, opt, spec.fingerprint)
    start = 0 if state is None else int(state["step"])
    run_t0 = time.perf_counter()
    base_elapsed = 0.0 if state is None else float(state["elapsed_s"])  # earlier runs' time
    # Rows logged after the last checkpoint will be logged again: cut them off.
    keep = 0 if state is None else int(state["metrics_bytes"])
    if metrics.exists() and metrics.stat().st_size > keep:
        with open(metrics, "r+b") as f:
            f.truncate(keep)
    if report is not None and start:
        report(start)

    order = _Order(member_seeds(seed)[1], store.n_contexts, cfg.batch_size)  # its data seed
    ckpts = set(spec.checkpoints)
    tokens_per_step = cfg.batch_size * spec.ctx
    # Since the last metrics row. The loss sum stays a float64 tensor on the device (the same
    # sequential float64 sum as Python floats): no device sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=spec.device)
    loss_n, step_time = 0, 0.0
    last: dict[str, Any] = {}
    for step in range(start, spec.steps):
        t0 = time.perf_counter()
        lr = lr_at(cfg, step, spec.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = order.rows(step)  # (B,) a function of (seed, step) only
        x = torch.from_numpy(np.asarray(data[rows, :spec.ctx], dtype=np.int64))  # (B, ctx)
        x = x.to(spec.device, non_blocking=True)
        loss = _lm_loss(model, x)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip,
                                           foreach=spec.device != "cpu")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_time += time.perf_counter() - t0
        loss_sum += loss.detach()
        loss_n += 1
        done = step + 1

        if done % cfg.log_every == 0 or done in ckpts:
            row: dict[str, Any] = {"step": done, "tokens": done * tokens_per_step,
                                   "train_loss": float(loss_sum) / loss_n}
            if held is not None and (done % cfg.eval_every == 0 or done in ckpts):
                row["heldout_loss"] = _heldout_loss(model, held, cfg.batch_size)
            row |= {"lr": lr,
                    "elapsed_s": round(base_elapsed + time.perf_counter() - run_t0, 3),
                    "tokens_per_s": round(loss_n * tokens_per_step / max(step_time, 1e-9), 1)}
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            last = row
            loss_sum.zero_()
            loss_n, step_time = 0, 0.0
        if done in ckpts:
            _save_checkpoint(sdir, done, model, tokenizer, {"seed": seed, **last,
                                                           "preset": cfg.preset,
                                                           "init_seed": member_seeds(seed)[0],
                                                           "data_seed": member_seeds(seed)[1]})
            _save_state(sdir, done, model, opt, {
                "elapsed_s": base_elapsed + time.perf_counter() - run_t0,
                "metrics_bytes": metrics.stat().st_size, "fingerprint": spec.fingerprint})
        if report is not None:
            report(1)
    if not last and metrics.exists():  # nothing to do: the seed was finished already
        lines = metrics.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    return {"seed": seed, **last}
