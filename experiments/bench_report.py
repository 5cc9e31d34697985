"""Rebuild a suite's markdown table, targets and plot from the rows it recorded.

    python experiments/bench_report.py                      # the newest issue10 run
    python experiments/bench_report.py --commit abc1234 --since 2026-12-02T02:00
    python experiments/bench_report.py --commit abc1234:pretrain-book,def5678
    python experiments/bench_report.py --commit abc1234:pretrain-book/train,def5678

A suite run writes experiments/results/bench_<suite>.md itself. This script is for a suite
run in parts (e.g. `--workloads pretrain-book`, then the fine-tuning workloads, on a
machine that cannot hold one long run): it takes every row of the suite that
experiments/results/bench.jsonl holds from one commit (and, with --since, from that time
on) and writes the same report over all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def load_rows(path, suite, commit=None, since=None):
    rows = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    rows = [r for r in rows if r.get('suite') == suite]
    if not rows:
        raise SystemExit(f'{path} holds no rows of suite {suite!r}')
    # one commit, or several separated by commas (parts run at commits that differ only
    # outside the measured code: say so where the report is quoted); `sha:w1+w2` takes
    # only those workloads' rows (and the matmul peak) from that commit, `w/mode` only
    # that mode's rows of w (train or infer; a whole loop is a train row)
    commit = commit or rows[-1].get('commit')
    wanted = {}
    for item in commit.split(','):
        sha, _, names = item.partition(':')
        wanted[sha] = {tuple(n.partition('/')[::2]) for n in names.split('+')} | \
            {('matmul-peak', '')} if names else None

    def taken(r):
        if r.get('commit') not in wanted:
            return False
        names = wanted[r['commit']]
        return names is None or (r.get('workload'), '') in names or \
            (r.get('workload'), r.get('mode')) in names

    rows = [r for r in rows if taken(r)]
    if since:
        rows = [r for r in rows if (r.get('date') or '') >= since]
    if not rows:
        raise SystemExit(f'no rows of suite {suite!r} at commit {commit} since {since}')
    return rows, commit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rows', default=os.path.join(HERE, 'results', 'bench.jsonl'))
    ap.add_argument('--suite', default='issue10')
    ap.add_argument('--commit', help='default: the commit of the newest row of the suite; '
                    'several: a,b')
    ap.add_argument('--since', help='ISO time: only rows recorded from then on')
    ap.add_argument('--out-dir', default=os.path.join(HERE, 'results'))
    args = ap.parse_args(argv)

    from gluon_bert.bench.report import (check_targets, format_targets, summarize,
                                         write_markdown, write_plot)
    rows, commit = load_rows(args.rows, args.suite, args.commit, args.since)
    summary = summarize(rows)
    targets = check_targets(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    md = write_markdown(os.path.join(args.out_dir, f'bench_{args.suite}.md'), rows, summary,
                        targets, title=f'gluon-bert bench --suite {args.suite} (commit {commit}, '
                                       f'{len(rows)} rows, run in parts)')
    png = write_plot(os.path.join(args.out_dir, f'bench_{args.suite}.png'), summary,
                     title=f'bench {args.suite}: examples/s')
    print(format_targets(targets))
    print(md, png, sep='\n')


if __name__ == '__main__':
    main()
