"""Training speed, side by side: the original configuration and the fast path, each in its own process.

Command line::

    python -m utils.speed.benchmark run --out results/04_speed_benchmark.json      # all configurations (GPU)
    python -m utils.speed.benchmark run --only original_fp16,fast_mb32_bf16 --out /tmp/b.json
    python -m utils.speed.benchmark run --budget strict8 --repeat 5 \
        --repeat-only original_fp16,fast_2x1_fp16,fast_2x1_graphs_fp16,original_corpus_fp16,fast_2x1_corpus_fp16,\
fast_2x1_graphs_corpus_fp16 --out results/04_speed_strict8.json
    python -m utils.speed.benchmark correctness --out results/04_fast_path_correctness.json  # embedded model
    python -m utils.speed.benchmark figure results/04_speed_benchmark.json         # redraw the figures
    python -m utils.speed.benchmark list                                           # the configurations

``run`` saves the random-weight Llama-3.2-3B twin once (bf16 safetensors), then measures every configuration in
a fresh ``python -m utils.speed.benchmark child`` process on the same GPU: a manual loop
(``utils.train_step.run_optimizer_steps``: autocast for the Hugging Face path, GradScaler for fp16, clip 0.5, the
configuration's optimizer), ``--warmup`` steps, then the median of ``--steps`` optimizer steps. Tokens/s counts
real (non-padding) tokens. The JSON is rewritten after every configuration, so a run stopped by a time limit keeps
what it measured. ``--tiny`` runs a 2-layer twin on the CPU to test the logic (not a result).

``--budget strict8`` runs every row, Unsloth's too, under the same 8 GB rules (``strict``): the cap left by the
measured CUDA context and the display reserve, the memory outside the allocator counted, ≤ 4 GiB pinned host
memory, LoRA dropout 0.05, one allocator setting; each row records its budget use. ``--resume`` continues a run
that a time limit stopped (same options, same ``--out``): only the rows it lacks, in the same order.

Modules: ``configs`` (the measured configurations), ``workloads`` (their batches), ``measure`` (one configuration
in a child process), ``run`` (the whole benchmark, correctness, multi-GPU), ``strict`` (the strict budget's rules,
ratios and table), ``cli`` (the command line), ``peer`` (Unsloth's import order). Reading the saved reports is
``utils.speed.results``; their figures, ``utils.plotting.speed``; their prose, ``utils.reports.speed``.

Only the configurations are exported here: ``python -m utils.speed.benchmark`` imports this package before
``__main__``, and a child process that measures Unsloth must import it before transformers, peft and trl, which
the measuring modules import (see ``peer``).
"""

from utils.speed.benchmark.configs import CONFIGS, CONFIGS_BY_NAME, BenchConfig, config_by_name

__all__ = ["CONFIGS", "CONFIGS_BY_NAME", "BenchConfig", "config_by_name"]
