"""`gluon-bert launch`: start a distributed training job, and stop all of it when any part fails.

    gluon-bert launch -n 2 -s 1 -- gluon-bert finetune --kvstore dist_sync ...
    gluon-bert launch -n 4 --hostfile hosts --launcher ssh -- gluon-bert pretrain --kvstore dist_sync ...
    gluon-bert launch -n 2 --launcher horovod -- gluon-bert finetune --kvstore horovod ...

MXNet's parameter server (ps-lite) has three roles: one scheduler, which every node first
contacts at DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT; servers, which hold the summed gradients;
and workers, which run the training command. A scheduler or server is a Python process that
imports mxnet with DMLC_ROLE set (mxnet then serves and exits). Workers and servers pick their
own ports; the scheduler's is a free port on the root host unless --port says otherwise.

Fail fast: a worker that exits with an error, or a scheduler or server that exits before
the workers are done (ps-lite then hangs everyone else), stops the whole job within seconds
(SIGTERM, then SIGKILL); the exit code and the message name the process and how it ended.
`--timeout` bounds the whole job. Ctrl-C asks the workers to stop (they save a checkpoint
at their next log row or checkpoint, where they agree to stop together); a second Ctrl-C
stops everything at once. Checkpoints are written atomically, so the job's last one stays
intact whatever happens.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from .errors import ConfigError

__all__ = ['Process', 'plan_local', 'plan_ssh', 'plan_horovod', 'read_hostfile', 'run_job',
           'free_port', 'launch']

# How long stopped processes get between SIGTERM and SIGKILL, and servers after the workers.
GRACE_S = 3.0
SERVER_EXIT_S = 30.0


@dataclasses.dataclass
class Process:
    """One process of the job: its name in messages, its command and its environment."""
    name: str
    argv: list[str]
    env: dict[str, str]
    role: str  # 'scheduler', 'server', 'worker' or 'horovod'
    popen: subprocess.Popen | None = None


def free_port(host: str = '127.0.0.1') -> int:
    """A TCP port that nothing listens on now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _dmlc_env(role, root, port, servers, workers, host, interface=None):
    env = dict(DMLC_ROLE=role, DMLC_PS_ROOT_URI=root, DMLC_PS_ROOT_PORT=str(port),
               DMLC_NUM_SERVER=str(servers), DMLC_NUM_WORKER=str(workers),
               DMLC_NODE_HOST=host)
    if interface:
        env['DMLC_INTERFACE'] = interface
    return env


def _serve_argv(python):
    # importing mxnet with DMLC_ROLE=scheduler/server runs that role and exits
    return [python, '-c', 'import mxnet']


def plan_local(command: Sequence[str], workers: int, servers: int = 1, host: str = '127.0.0.1',
               interface: str | None = 'lo', port: int | None = None) -> list[Process]:
    """Scheduler, servers and workers on this machine (127.0.0.1 and the loopback interface
    by default, so nothing listens on an outward interface)."""
    _check_counts(workers, servers)
    port = port or free_port(host)
    py = sys.executable
    plan = [Process('scheduler', _serve_argv(py),
                    _dmlc_env('scheduler', host, port, servers, workers, host, interface),
                    'scheduler')]
    plan += [Process(f'server {i}', _serve_argv(py),
                     _dmlc_env('server', host, port, servers, workers, host, interface), 'server')
             for i in range(servers)]
    plan += [Process(f'worker {i}', list(command),
                     _dmlc_env('worker', host, port, servers, workers, host, interface), 'worker')
             for i in range(workers)]
    return plan


def read_hostfile(path: str) -> list[str]:
    """Host names, one per line ('#' starts a comment); `host:N` repeats a host N times."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ConfigError(f'--hostfile {path}: {err.strerror or err}') from None
    hosts = []
    for lineno, line in enumerate(lines, 1):
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(':')
        if not host or (slots and not slots.isdigit()) or slots == '0':
            raise ConfigError(f'{path}, line {lineno}: expected host or host:N, got {line!r}')
        hosts += [host] * int(slots or 1)
    if not hosts:
        raise ConfigError(f'{path}: no hosts')
    return hosts


def plan_ssh(command: Sequence[str], workers: int, servers: int, hosts: Sequence[str],
             port: int | None = None, cwd: str | None = None) -> list[Process]:
    """The scheduler on the first host, servers and workers round-robin over `hosts`, each
    started with `ssh HOST 'cd CWD && env DMLC_...=... COMMAND'` (password-less ssh, the
    same installation path and a shared file system for the run folder are assumed)."""
    _check_counts(workers, servers)
    root = hosts[0]
    port = port or 9091
    cwd = cwd or os.getcwd()

    def remote(host, role, argv):
        env = _dmlc_env(role, root, port, servers, workers, host)
        line = 'cd {} && env {} {}'.format(
            shlex.quote(cwd), ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items()),
            ' '.join(shlex.quote(a) for a in argv))
        return ['ssh', '-o', 'BatchMode=yes', host, line]

    py = sys.executable
    plan = [Process(f'scheduler@{root}', remote(root, 'scheduler', _serve_argv(py)), {},
                    'scheduler')]
    plan += [Process(f'server {i}@{hosts[i % len(hosts)]}',
                     remote(hosts[i % len(hosts)], 'server', _serve_argv(py)), {}, 'server')
             for i in range(servers)]
    plan += [Process(f'worker {i}@{hosts[i % len(hosts)]}',
                     remote(hosts[i % len(hosts)], 'worker', list(command)), {}, 'worker')
             for i in range(workers)]
    return plan


def plan_horovod(command: Sequence[str], workers: int, hosts: Sequence[str] | None = None,
                 interface: str = 'lo') -> list[Process]:
    """Horovod ranks over Gloo. On this machine (no host file) the launcher starts the ranks
    itself with a rendezvous server bound to 127.0.0.1 (see `_loopback_rendezvous`): the
    stock `horovodrun` binds its rendezvous to every interface. With a host file, one
    `horovodrun --gloo` starts every rank on its hosts."""
    if workers < 1:
        raise ConfigError(f'-n must be at least 1, got {workers}')
    if not hosts:
        return [Process(f'worker {i}', list(command), {}, 'worker') for i in range(workers)]
    counts = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    spec = ','.join(f'{h}:{n}' for h, n in counts.items())
    # the horovodrun of this installation, when there is one beside this Python
    beside = os.path.join(os.path.dirname(sys.executable), 'horovodrun')
    runner = beside if os.path.exists(beside) else 'horovodrun'
    argv = [runner, '--gloo', '-np', str(workers), '-H', spec,
            '--network-interface', interface, *command]
    return [Process('horovodrun', argv, {}, 'horovod')]


def _loopback_rendezvous(plan: list[Process]):
    """Serve Horovod's Gloo rendezvous on 127.0.0.1 and give each local rank the
    environment that `horovodrun` would (rank, sizes, rendezvous address, loopback)."""
    try:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
        from horovod.runner.util.threads import in_thread
    except ImportError as err:
        raise ConfigError(f'--launcher horovod needs Horovod ({err}); install it with '
                          '`bash scripts/setup.sh horovod`') from None
    server = RendezvousHTTPServer(('127.0.0.1', 0), RendezvousHandler, 0)
    slots = get_host_assignments(parse_hosts(f'localhost:{len(plan)}'), len(plan))
    server.init(slots)
    in_thread(target=server.serve_forever)
    for p, slot in zip(plan, slots):
        p.env.update(HOROVOD_HOSTNAME=slot.hostname, HOROVOD_RANK=str(slot.rank),
                     HOROVOD_SIZE=str(slot.size), HOROVOD_LOCAL_RANK=str(slot.local_rank),
                     HOROVOD_LOCAL_SIZE=str(slot.local_size),
                     HOROVOD_CROSS_RANK=str(slot.cross_rank),
                     HOROVOD_CROSS_SIZE=str(slot.cross_size),
                     HOROVOD_GLOO_RENDEZVOUS_ADDR='127.0.0.1',
                     HOROVOD_GLOO_RENDEZVOUS_PORT=str(server.server_address[1]),
                     HOROVOD_CONTROLLER='gloo', HOROVOD_CPU_OPERATIONS='gloo',
                     HOROVOD_GLOO_IFACE='lo')
    return server


def _check_counts(workers, servers):
    if workers < 1:
        raise ConfigError(f'-n must be at least 1, got {workers}')
    if servers < 1:
        raise ConfigError(f'-s must be at least 1, got {servers}')


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f'killed by {signal.Signals(-returncode).name}'
        except ValueError:
            return f'killed by signal {-returncode}'
    return f'exited with code {returncode}'


def _signal_all(plan, sig):
    for p in plan:
        if p.popen is not None and p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, sig)
            except ProcessLookupError:
                pass


def _stop_all(plan, grace=GRACE_S):
    """SIGTERM every process group still running, then SIGKILL what is left after `grace`."""
    _signal_all(plan, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in plan if p.popen):
        time.sleep(0.05)
    _signal_all(plan, signal.SIGKILL)
    for p in plan:
        if p.popen is not None:
            p.popen.wait()


def _die_with_launcher():
    """In the child, before exec: the kernel kills it when the launcher dies, however the
    launcher dies (Linux; elsewhere a no-op), so that no process of a job outlives it."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _say(msg):
    print(f'gluon-bert launch: {msg}', file=sys.stderr, flush=True)


def run_job(plan: list[Process], timeout: float | None = None, poll_s: float = 0.1,
            interrupt_grace: float = 120.0) -> int:
    """Start every process of `plan` and watch them; returns the job's exit code (0 when
    every worker succeeded)."""
    try:
        for p in plan:
            env = dict(os.environ, **p.env)
            # its own session: a kill reaches the process and everything it started
            p.popen = subprocess.Popen(p.argv, env=env, start_new_session=True,
                                       preexec_fn=_die_with_launcher,
                                       stdout=None if p.role in ('worker', 'horovod')
                                       else subprocess.DEVNULL)
    except OSError as err:
        _stop_all(plan)
        _say(f'cannot start {p.name} ({p.argv[0]}): {err.strerror or err}')
        return 2
    _say(', '.join(f'{p.name} pid {p.popen.pid}' for p in plan))
    started = time.monotonic()
    workers = [p for p in plan if p.role in ('worker', 'horovod')]
    services = [p for p in plan if p not in workers]
    services_done = {}  # services that exited cleanly -> when

    def terminated(signum, frame):  # a batch scheduler stopping the launcher
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return _watch(plan, workers, services, started, timeout, poll_s, interrupt_grace,
                      services_done)
    except SystemExit as stop:
        _say('SIGTERM: stopping the job')
        _stop_all(plan)
        return stop.code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(plan, workers, services, started, timeout, poll_s, interrupt_grace, services_done):
    interrupted_at = None
    while True:
        try:
            time.sleep(poll_s)
            # a worker that failed, or a service that left before the workers were done
            for p in plan:
                code = p.popen.poll()
                if code is None or (code == 0 and p in workers):
                    continue
                if interrupted_at is not None and p in workers:
                    continue  # stopping on request: their codes are 130/143
                if code == 0 and p in services:
                    # ps-lite ends its services once every worker has said goodbye; the
                    # workers may still be exiting, so give them a moment
                    if p.name not in services_done:
                        services_done[p.name] = time.monotonic()
                    if time.monotonic() - services_done[p.name] < SERVER_EXIT_S:
                        continue
                    _say(f'{p.name} (pid {p.popen.pid}) exited while workers still ran; '
                         'stopping the job')
                    _stop_all(plan)
                    return 1
                _say(f'{p.name} (pid {p.popen.pid}) {_how(code)}; stopping the job')
                _stop_all(plan)
                return code if code > 0 else 128 - code
            if all(p.popen.poll() is not None for p in workers):
                codes = [p.popen.returncode for p in workers]
                deadline = time.monotonic() + SERVER_EXIT_S
                while time.monotonic() < deadline and any(p.popen.poll() is None
                                                          for p in services):
                    time.sleep(poll_s)
                _stop_all(services)
                if interrupted_at is not None:
                    _say('stopped on request; the workers saved where they stood')
                    return 130
                return max(codes)
            if timeout and time.monotonic() - started > timeout:
                _say(f'the job ran past --timeout {timeout:g} s; stopping it')
                _stop_all(plan)
                return 124
            if interrupted_at is not None and time.monotonic() - interrupted_at > interrupt_grace:
                _say(f'the workers did not stop within {interrupt_grace:g} s; killing the job')
                _stop_all(plan)
                return 130
        except KeyboardInterrupt:
            if interrupted_at is not None:
                _say('second Ctrl-C: killing the job (its last checkpoint is intact)')
                _stop_all(plan, grace=0.5)
                return 130
            interrupted_at = time.monotonic()
            _say('Ctrl-C: asking the workers to save and stop (Ctrl-C again to kill)')
            for p in workers:
                if p.popen.poll() is None:
                    try:
                        os.killpg(p.popen.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass


def _worker_command(command: Sequence[str]) -> list[str]:
    """`gluon-bert ...` runs as this Python's module, so the workers use this installation."""
    command = list(command)
    if command and command[0] == '--':
        command = command[1:]
    if not command:
        raise ConfigError('give the command to run after --, e.g. '
                          '`gluon-bert launch -n 2 -- gluon-bert finetune --kvstore dist_sync`')
    if os.path.basename(command[0]) == 'gluon-bert':
        command = [sys.executable, '-m', 'gluon_bert.cli', *command[1:]]
    return command


def launch(command: Sequence[str], workers: int, servers: int = 1, launcher: str = 'local',
           hostfile: str | None = None, timeout: float | None = None,
           port: int | None = None) -> int:
    """Plan and run a job (the `gluon-bert launch` command)."""
    if timeout is not None and timeout <= 0:
        raise ConfigError(f'--timeout must be positive, got {timeout:g}')
    command = _worker_command(command)
    hosts = read_hostfile(hostfile) if hostfile else None
    if launcher == 'local':
        if hosts:
            raise ConfigError('--hostfile is for --launcher ssh or horovod')
        plan = plan_local(command, workers, servers, port=port)
    elif launcher == 'ssh':
        if not hosts:
            raise ConfigError('--launcher ssh needs --hostfile')
        plan = plan_ssh(command, workers, servers, hosts, port=port)
    elif launcher == 'horovod':
        plan = plan_horovod(command, workers, hosts)
        if not hosts:
            server = _loopback_rendezvous(plan)
            try:
                return run_job(plan, timeout=timeout)
            finally:
                server.shutdown()
    else:
        raise ConfigError(f'unknown --launcher {launcher!r}: local, ssh or horovod')
    return run_job(plan, timeout=timeout)
