# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Universal neurons in a seed zoo, from Python
#
# This notebook runs the whole analysis of Gurnee et al. (2024), *Universal Neurons in GPT2
# Language Models*, and the ablations of Nandan et al. (2025) on a **micro zoo built here**:
# three tiny GPT-2s that differ only in their random seed, trained for a few seconds on the
# Python standard library (the one corpus every machine has). Everything runs offline on a CPU
# in about a minute; every step is the function the command line calls
# (`un.correlate` is `unineurons correlate`, and so on), with the same options as keywords.
#
# The tiny models are far from GPT-2 small: few of their neurons pass the paper's threshold
# (excess correlation > 0.5), which was set for models trained on billions of tokens. The
# notebook therefore inspects the *most* universal neurons, whatever their number. For real
# models replace the zoo by hub ids (`"stanford-crfm/alias-gpt2-small-x21@checkpoint-400000"`)
# and the corpus by `hf:...`; nothing else changes.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

import unineurons as un

# a fresh working folder (set UNINEURONS_TUTORIAL_DIR to keep the results somewhere)
WORK = Path(os.environ.get("UNINEURONS_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="unineurons_"))
print(un.__version__, WORK)

# %% [markdown]
# ## 1. Data: a tokenizer and two token stores
#
# A byte-level BPE tokenizer of 512 tokens, then contexts of 64 tokens (BOS + 63): a training
# split for the zoo and a held-out split (no shared document) on which neurons are compared.

# %%
tokenizer = un.train_tokenizer("stdlib", 512, WORK / "tokenizer", max_chars=300_000)
train = un.build_tokens("stdlib", tokenizer, WORK / "train", n_tokens=16_384, ctx=64)
heldout = un.build_tokens("stdlib", tokenizer, WORK / "heldout", n_tokens=4_096, ctx=64,
                          split="heldout")
train, heldout

# %% [markdown]
# ## 2. A seed zoo: three models that differ only in their seed
#
# Each seed sets both the initial weights and the order of the training data. Checkpoints are
# kept at steps 25 and 100, so we can also ask when universality appears.

# %%
zoo = un.train_zoo(WORK / "train", WORK / "zoo", preset="micro", seeds=[0, 1, 2], steps=100,
                   checkpoints=[25, 100], heldout=WORK / "heldout", n_layer=2, workers=2)
{seed: round(s["heldout_loss"], 3) for seed, s in zoo.info()["per_seed"].items()}

# %% [markdown]
# ## 3. Correlate: which neurons have a partner in every other seed?
#
# For every neuron of seed 0 (the reference) and every other seed, the Pearson correlation
# with its best-matching partner neuron over the held-out tokens, against the same for the
# partner's layer under a random rotation (the baseline). The excess correlation ϱ is the
# difference, averaged over partners (Gurnee et al., sec. 3). `correlate` returns a `Run`: the
# run directory's tables as pandas DataFrames, read on first use.

# %%
run = un.correlate(models=zoo.models(), tokens=WORK / "heldout", out=WORK / "run")
run

# %% [markdown]
# `run.layers` summarises each layer: the mean best correlation, the rotation baseline, the
# ceiling (a neuron against its own model rotated: the most any neuron could exceed the
# baseline by), and the share of neurons whose best partner passes ρ > 0.7, next to the same
# share for the baseline.

# %%
run.layers[["layer", "neurons", "universal", "mean_max_corr", "mean_baseline_corr",
            "mean_excess_corr", "mean_ceiling_corr", "share_max_gt_0.7", "share_baseline_gt_0.7"]]

# %%
print(f"{len(run.universal())} neurons pass the paper's threshold (excess > 0.5)")
top = run.neurons.sort_values("excess_corr", ascending=False).head(10)
top[["address", "max_corr", "baseline_corr", "excess_corr", "is_universal"]]

# %% [markdown]
# ## 4. Analyze: what the neurons respond to and what they do
#
# Activation statistics, top activating contexts, token families, the vocabulary a neuron
# promotes or suppresses through the unembedding, and functional roles (Gurnee et al.,
# sec. 4-5).

# %%
un.analyze(run, n_tokens=2048, batch_size=16)
run.neurons.groupby("layer")[["act_kurt", "vocab_kurt", "act_freq"]].mean()

# %% [markdown]
# ## 5. One neuron, up close
#
# `run.neuron("L1.N12")` gathers one neuron's statistics, its best match in every seed, its top
# contexts and its vocabulary effects; in Jupyter it displays as a card (the terminal shows the
# same card with `unineurons show RUN L1.N12`).

# %%
address = top["address"].iloc[0]
neuron = run.neuron(address)
neuron

# %%
neuron.matches

# %%
neuron.contexts[["rank", "value", "before", "token", "after"]]

# %%
neuron.plot(n_tokens=2048)

# %% [markdown]
# ## 6. Ablate: how much does the model need its most universal neurons?
#
# Zero-ablate the top-n neurons by excess correlation (`rank_all`: below the threshold too),
# the least universal ones, and layer-matched random sets, and measure the increase of the
# next-token loss (Nandan et al. 2025).

# %%
un.ablate(run, sizes=[1, 4, 16], rank_all=True, random_draws=2, n_tokens=1024,
          batch_size=16)
curve = (run.ablations[run.ablations["layer"] == -1]
         .groupby(["set", "n_ablated"])["delta_loss"].mean().unstack("set"))
curve

# %%
ax = curve.plot(marker="o", logx=True, figsize=(5, 3.2))
ax.set_xlabel("neurons ablated")
ax.set_ylabel("loss increase (nats)")
ax.set_title("zero ablation of neuron sets")
plt.show()

# %% [markdown]
# ## 7. Universality during training
#
# The same correlation at every checkpoint of the zoo: the share of the top 5 % most universal
# neurons at the last step that were already among the top 5 % earlier (Nandan et al. 2025).

# %%
dyn = un.dynamics(WORK / "dynamics", zoo=zoo, tokens=WORK / "heldout", n_tokens=2048,
                  universal="top:0.05")
dyn.persistence[dyn.persistence["layer"] == -1][["step", "later_step", "p_persist", "jaccard"]]

# %% [markdown]
# ## 8. Hand the neurons to other tools
#
# The same neurons under TransformerLens hook names (`blocks.{layer}.mlp.hook_post`, index
# `neuron`) and Hugging Face module paths (the MLP output projection whose input is the
# neuron); `run.export(...)` writes them as CSV or JSON (`unineurons export RUN`).

# %%
names = run.to_transformer_lens_names(top)
names[["address", "tl_hook", "tl_index", "hf_module", "excess_corr"]].head()

# %%
run.export(WORK / "top_neurons.csv", all_neurons=True)
print((WORK / "top_neurons.csv").read_text().splitlines()[0])
