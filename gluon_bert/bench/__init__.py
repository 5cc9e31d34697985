"""One benchmark harness for every framework, each variant in a process of its own.

    gluon-bert bench --suite issue10             the whole benchmark (many minutes on 2 cores)
    gluon-bert bench --suite issue10 --quick     the same, tiny (CI's smoke test)
    gluon-bert bench --frameworks mxnet,d2l --preset tiny --batch-size 8 ...   one workload

Variants (`suite.VARIANTS`): the book's own d2l code in MXNet (`d2l-mxnet`) and PyTorch
(`d2l-pytorch`); this package imperative (`ours-imperative`), hybridized (`ours-hybrid`; its
pretraining step packed, `data.packing`), hybridized with the padded pretraining step
(`ours-padded`) and, for the whole fine-tuning loop, length-bucketed (`ours-bucketed`); GluonNLP 0.10's BERT of
the same shape (`gluonnlp`); our PyTorch port eager and compiled (`torch-eager`,
`torch-compile`) and our JAX port (`jax-jit`). Workloads (`suite.WORKLOADS`): the book's
pretraining shape (`pretrain-book`), `bert.small` fine-tuning at batch 128 and 512
(`finetune-small-128`, `finetune-small-512`) and `bert.base` (`finetune-base`), each as a
training step and as inference, and where a workload says so the whole training loop with
its data pipeline (real WikiText-2 / SNLI dev from ../shared/data when present, else the
shipped sample).

How it measures. The parent writes the initial weights and one synthetic batch per workload
(same seed) to files; each measurement runs in a fresh worker (`python -m
gluon_bert.bench.worker`) with the same environment: OMP_NUM_THREADS as `gluon-bert` sets it,
OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep: spinning ones made steps up to 100x
slower on a shared 2-core machine; yours wins if set) and glibc's allocator tuned as
`gluon-bert` runs (`cli.GLIBC_TUNABLES`; `--allocator system` for glibc's defaults). A worker warms up, then times each step with an explicit sync before
the timer stops (`mx.nd.waitall()`, `torch.cuda.synchronize()` on CUDA,
`block_until_ready()`), and records getrusage over the timed steps (minor page faults and
system seconds per step, peak RSS). Each round also times MXNet's FullyConnected at 2048^3
in float32 and bfloat16: the machine's matmul peak, against which the model's FLOP/s
(`flops.model_flops`, counted from the shape; `flops.packed_model_flops` for a packed
step, which skips the padding) are shared. The pretraining batch has the book's WikiText-2
lengths (`ports.synthetic.WIKITEXT2_LENGTHS`). `--repeats R` runs R rounds back to
back; ratios are taken within a round, then summarised (median, range).

Output: one JSON line per measurement and round appended to experiments/results/bench.jsonl;
for a suite also experiments/results/bench_<suite>.md (the targets of issue 10 checked, and
every measurement) and bench_<suite>.png. A variant whose framework is not installed gives a
`skipped` row; a worker that crashes or runs past --timeout gives an `error` row, and the run
goes on.
"""
from .flops import model_flops, model_macs, packed_model_flops
from .harness import DEFAULT_OUT, RESULTS_DIR, run_bench, run_measurements, run_suite, stats
from .report import (TARGETS, check_targets, format_rows, format_summary, format_targets,
                     summarize, write_markdown, write_plot)
from .suite import ALIASES, SUITES, VARIANTS, WORKLOADS, Measurement, Workload, plan

__all__ = ['run_bench', 'run_suite', 'run_measurements', 'format_rows', 'format_summary',
           'format_targets', 'model_flops', 'model_macs', 'packed_model_flops',
           'check_targets', 'summarize', 'write_markdown', 'write_plot', 'stats', 'TARGETS',
           'VARIANTS', 'WORKLOADS', 'SUITES', 'ALIASES', 'Measurement', 'Workload', 'plan',
           'DEFAULT_OUT', 'RESULTS_DIR']
