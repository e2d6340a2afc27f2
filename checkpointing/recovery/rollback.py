"""Roll a job back to a past step on every level, keeping everything later aside.

``python -m checkpointing.recovery.rollback STEP --save DIR [--ckpt-local-dir DIR] [--dry-run] [--branch NAME]``
(``scripts/rollback.sh`` wraps it):

- every checkpoint directory after STEP, committed or not, is moved into
  ``<level>/branches/<NAME>/`` (NAME defaults to ``rollback-<time>-from-<old latest>``): nothing is
  deleted, and the abandoned branch can be moved back by hand;
- each level's tracker names STEP if the level holds a committed STEP, else its newest committed
  checkpoint before STEP (or is removed when there is none);
- L0 versions after STEP (shared memory) have their description set aside, so a restart does not
  resume from them;
- a STEP with no committed checkpoint on any level is refused, naming the nearest ones.

``--list`` prints every checkpoint on every level with its state and size instead.

``--live`` asks a running job to roll back in its own processes (``checkpointing.recovery.rollback_request``,
``checkpointing.recovery.live_rollback``) and waits for its answer; ``--iterations-to-skip`` and the LR
flags of ``LIVE_SETTINGS`` go with it.

L0 and L1 are per node: on several nodes, run it on every node (L2, shared, is rolled back by
the first) with the same ``--branch``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from checkpointing.base import job_lock
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.durable import TRACKER_NAME, describe_tracker, fsync_directory, write_tracker
from checkpointing.base.levels import L1, L2, SHM_DIR
from checkpointing.recovery.rollback_request import (
    LIVE_SETTINGS,
    RequestRefused,
    RollbackRequest,
    wait_for_answer,
    withdraw,
    write_request,
)
from cli.flags import add_flag, refuse_renamed


class RollbackRefused(ValueError):
    """STEP cannot be rolled back to; the message lists what exists."""


ROLLBACK_RECORD = "rollbacks.jsonl"
"""In ``--save``: one JSON line per rollback (step, time, branch)."""


def rollbacks(save_dir: str | None) -> list[dict]:
    """The rollbacks recorded in ``save_dir`` (oldest first); lines that are not a record are skipped."""
    path = os.path.join(save_dir or "", ROLLBACK_RECORD)
    if not save_dir or not os.path.isfile(path):
        return []
    found = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("time"), float):
                found.append(record)
    return found


def abandoning(records: list[dict], iteration: int, written: float) -> dict | None:
    """The rollback (of :func:`rollbacks`) whose branch a version of ``iteration`` written at
    ``written`` (seconds since the epoch) belongs to: one to a step below ``iteration``, made
    after the version was written. None: the version is on the current branch."""
    return next((r for r in records if iteration > r["step"] and written < r["time"]), None)


def plan(step: int, save_dir: str, local_dir: str | None, branch: str,
         host_dir: str | None = SHM_DIR, levels: list[tuple[str, str]] | None = None,
         held_in_memory: tuple[int, ...] | None = None, record: bool = True) -> list[tuple[str, tuple]]:
    """(description, action) pairs; nothing is changed here.

    A stopped job (the defaults): L1 (with ``local_dir``) and L2, the L0 descriptions in
    ``host_dir``, and the record. A running job's live rollback (``checkpointing.recovery.live_rollback``)
    passes the ``levels`` this rank moves (its node's L1, L2 on rank 0), ``host_dir`` None (the
    engine drops its own slots), ``held_in_memory``: the versions every rank holds in L0 (STEP
    there is enough: the job goes on from it), and ``record`` on rank 0 only."""
    from checkpointing.format.discovery import list_checkpoints
    from checkpointing.recovery.inventory import check_directory, l0_entries

    if levels is None:
        levels = [(L1, local_dir), (L2, save_dir)] if local_dir else [(L2, save_dir)]
    held = {}
    for level, root in levels:
        committed = [c for c in list_checkpoints(root) if c.committed and check_directory(c.path, False)[0] == "committed"]
        held[level] = committed
    l0_versions = [e.iteration for e in l0_entries(save_dir, host_dir)] if host_dir else list(held_in_memory or ())
    everywhere = sorted({c.iteration for cs in held.values() for c in cs} | set(l0_versions))
    if not any(c.iteration == step for cs in held.values() for c in cs) and step not in l0_versions:
        raise RollbackRefused(
            f"no committed checkpoint of iteration {step} on any level ({', '.join(r for _, r in levels if r)}"
            f"{', L0' if l0_versions else ''}); nearest: {nearest(everywhere, step)}")
    if held_in_memory is None and step not in [c.iteration for cs in held.values() for c in cs]:
        raise RollbackRefused(f"iteration {step} is only in host memory (L0), which a rollback cannot keep as "
                              f"the latest across restarts; roll back to one on disk: {[i for i in everywhere if i != step][-4:]}")
    taken = [os.path.join(root, "branches", branch) for _, root in levels
             if os.path.lexists(os.path.join(root, "branches", branch))]
    if taken:  # refused before anything moves: a rollback is done whole or not at all
        raise RollbackRefused(f"branch {branch!r} exists already ({', '.join(taken)}); pass another --branch")
    actions = []
    for level, root in levels:
        later = [c for c in list_checkpoints(root) if c.iteration > step]
        target = os.path.join(root, "branches", branch)
        for c in later:
            actions.append((f"{level}: move {c.path} -> {os.path.join(target, os.path.basename(c.path))}",
                            ("move", c.path, target)))
        kept = [c.iteration for c in held[level] if c.iteration <= step]
        if kept:
            actions.append((f"{level}: tracker {describe_tracker(root)} -> {kept[-1]}", ("tracker", root, kept[-1])))
        elif os.path.exists(os.path.join(root, TRACKER_NAME)):
            actions.append((f"{level}: no committed checkpoint at or before {step}: tracker removed "
                            f"(moved to {target})", ("tracker-aside", root, target)))
    for entry in l0_entries(save_dir, host_dir) if host_dir else ():
        if entry.iteration > step:
            for data in entry.paths:
                actions.append((f"L0: version {entry.iteration} set aside ({data}.meta -> .meta.{branch})",
                                ("l0", data + ".meta", f"{data}.meta.{branch}")))
    # Host memory on other nodes (their L0 slots, the peer replicas they hold) is out of reach
    # here: the record tells a resume from memory that what they hold above ``step`` is of the
    # abandoned branch (checkpointing.recovery.memory_recovery).
    if record:
        actions.append((f"{save_dir}/{ROLLBACK_RECORD}: host-memory versions above {step} written before now are "
                        "not resumed from", ("record", save_dir, step, branch)))
    return actions


def format_branches(save_dir: str, local_dir: str | None) -> list[str]:
    """Lines for ``--list``: each recorded rollback and what its branch folder holds on each level."""
    from checkpointing.format.discovery import list_checkpoints

    records = rollbacks(save_dir)
    if not records:
        return []
    lines = ["branches (abandoned by a rollback; move an iter_* back by hand to use it):"]
    for record in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
        held = []
        for level, root in ((L1, local_dir), (L2, save_dir)):
            folder = os.path.join(root or "", "branches", str(record.get("branch", "")))
            if root and os.path.isdir(folder):
                its = sorted(c.iteration for c in list_checkpoints(folder))
                held.append(f"{level} {len(its)} version(s)" + (f" {its[0]}-{its[-1]}" if its else ""))
        lines.append(f"  {when}: back to {record['step']}, branch {record.get('branch', '?')}"
                     f"{' (live)' if record.get('live') else ''}: {', '.join(held) or 'nothing moved'}")
    return lines


def nearest(steps: list[int], step: int) -> str:
    """The two held steps below ``step`` and the two above, for a refusal's message."""
    near = [i for i in steps if i < step][-2:] + [i for i in steps if i > step][:2]
    return str(near) if near else "none at all"


def apply(actions: list[tuple[str, tuple]]) -> None:
    for _, action in actions:
        kind = action[0]
        if kind == "move":
            _, path, target = action
            os.makedirs(target, exist_ok=True)
            os.rename(path, os.path.join(target, os.path.basename(path)))
            fsync_directory(os.path.dirname(path))
        elif kind == "tracker":
            write_tracker(action[1], action[2])
        elif kind == "tracker-aside":
            os.makedirs(action[2], exist_ok=True)
            os.rename(os.path.join(action[1], TRACKER_NAME), os.path.join(action[2], TRACKER_NAME))
        elif kind == "l0":
            os.rename(action[1], action[2])
        elif kind == "record":
            _, root, step, branch, *more = action
            extra = more[0] if more else {}
            with open(os.path.join(root, ROLLBACK_RECORD), "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), "branch": branch, **extra}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rollback.sh", description="Roll a training job back to a past step.")
    parser.add_argument("step", nargs="?", type=int, help="the iteration to make the latest")
    # The job's directories, under the trainer's own flags (a job's command line can be copied).
    add_flag(parser, CheckpointConfig, "save", default="ckpts")
    add_flag(parser, CheckpointConfig, "local_dir")
    add_flag(parser, CheckpointConfig, "host_dir", default=None, action="append",
             help=f"the job's L0 directory, if not {SHM_DIR}; with --list it may be given once per node directory "
                  "(nodes sharing one machine), and peer replicas are listed with the nodes that hold them")
    refuse_renamed(parser, {"--local-dir": "--ckpt-local-dir", "--host-dir": "--ckpt-host-dir"})
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    parser.add_argument("--branch", help="name of the folder later checkpoints are moved into")
    parser.add_argument("--list", action="store_true", help="list every checkpoint on every level instead")
    live = parser.add_argument_group("a running job (docs/rolling-back.md)")
    live.add_argument("--live", action="store_true",
                      help="ask the job running on --save to roll back in its own processes, and wait for its answer")
    live.add_argument("--timeout", type=float, default=600.0,
                      help="with --live: seconds to wait for the job's answer (default: 600)")
    live.add_argument("--iterations-to-skip", type=int, nargs="+", default=[], metavar="ITERATION",
                      help="with --live: iterations whose batches the new branch skips")
    for name, (_, kind) in LIVE_SETTINGS.items():
        live.add_argument(name, dest=name[2:].replace("-", "_"), type=kind, metavar=kind.__name__.upper(),
                          help=f"with --live: the new branch's {name}")
    parser.add_argument("--verify", action="store_true", help="with --list: also verify every checksum (reads all data)")
    args = parser.parse_args(argv)
    host_dirs = args.host_dir or [SHM_DIR]
    args.host_dir = host_dirs[0]
    if args.list:
        from checkpointing.recovery.inventory import all_entries, format_table  # torch: not for --live's quick answer

        print(format_table(all_entries(args.save, args.local_dir, args.verify, host_dirs), args.save, args.local_dir))
        for line in format_branches(args.save, args.local_dir):
            print(line)
        return 0
    if args.step is None:
        parser.error("give STEP, or --list")
    settings = [(name, getattr(args, name[2:].replace("-", "_"))) for name in LIVE_SETTINGS
                if getattr(args, name[2:].replace("-", "_")) is not None]
    if args.live:
        if args.dry_run or args.local_dir or args.host_dir != SHM_DIR or len(host_dirs) > 1:
            parser.error("--live takes STEP and --save only (the job knows its levels); --dry-run, --ckpt-local-dir "
                         "and --ckpt-host-dir are for a stopped job")
        return _ask_live(args.save, args.step, args.branch, tuple(args.iterations_to_skip), tuple(settings),
                         args.timeout)
    if args.iterations_to_skip or settings:
        parser.error("--iterations-to-skip and the LR flags go with --live; a stopped job takes them on the command "
                     "line it is relaunched with")
    latest = describe_tracker(args.save).split(" ")[0]  # names the branch: "damaged" where it is
    branch = args.branch or f"rollback-{time.strftime('%Y%m%d-%H%M%S')}-from-{latest}"
    try:
        actions = plan(args.step, args.save, args.local_dir, branch, args.host_dir)
    except RollbackRefused as error:
        print(f"rollback.sh: refused: {error}", file=sys.stderr)
        return 2
    prefix = "would " if args.dry_run else ""
    for description, _ in actions:
        print(f"{prefix}{description}")
    if not args.dry_run:
        apply(actions)
        print(f"rolled back to iteration {args.step}; later checkpoints are in branches/{branch}/. "
              f"Resume with --load {args.save}")
    return 0


def _ask_live(save_dir: str, step: int, branch: str | None, skips: tuple[int, ...], settings: tuple,
              timeout: float) -> int:
    """Write the request, wait for the job's answer, print it: 0 rolled back, 2 refused, 3 no answer.

    A request is written only where a job may be running: its rank 0 holds ``--save``'s lock
    file (``checkpointing.base.job_lock``), which says who holds or last held it. With no lock
    file, or a holder on this host that has ended, nothing would ever answer, and a request left
    behind would roll back the next job launched on this ``--save``: refused at once. A job that
    ends while the request waits (this host's) has it withdrawn."""
    stopped = f"a stopped job is rolled back without --live: scripts/rollback.sh {step} --save {save_dir}"
    lock = job_lock.lock_path_for_save(save_dir)
    holder = job_lock.last_holder(lock)
    try:
        request = RollbackRequest.new(step, branch=branch, iterations_to_skip=skips, settings=settings,
                                      job=holder.key() if holder is not None else None)
        if not os.path.isdir(save_dir):
            raise RequestRefused(f"--save {save_dir} is not a directory: give the running job's --save")
        if not os.path.lexists(lock):
            raise RequestRefused(f"no job is running on --save {save_dir} (a running job holds {lock}, and there is "
                                 f"none); {stopped}")
        if holder is not None and job_lock.has_ended(holder, lock):
            raise RequestRefused(f"no job is running on --save {save_dir}: the last one, {holder.describe()}, has "
                                 f"ended; {stopped}")
        path = write_request(save_dir, request)
    except (RequestRefused, OSError) as error:
        print(f"rollback.sh: refused: {error}", file=sys.stderr)
        return 2
    print(f"asked the job on {save_dir} to roll back to {request.describe()} ({path}); waiting for its answer ...",
          flush=True)
    ended = (lambda: job_lock.has_ended(holder, lock)) if holder is not None else None
    answer = wait_for_answer(save_dir, request, timeout,
                             lambda waited: print(f"  still waiting ({waited:.0f} s): the job takes requests between "
                                                  "iterations", flush=True), gone=ended)
    if answer is None and ended is not None and ended():
        if withdraw(save_dir, request):
            print(f"rollback.sh: the job on --save {save_dir} ({holder.describe()}) ended before it took the "
                  f"request; the request was withdrawn, nothing was rolled back; {stopped}", file=sys.stderr)
        else:
            print(f"rollback.sh: the job on --save {save_dir} ({holder.describe()}) took the request and ended "
                  "before it answered; its log says how far it got, and rollback.sh --list what each level holds",
                  file=sys.stderr)
        return 3
    if answer is None:
        print(f"rollback.sh: no answer in {timeout:.0f} s; is a job with --async-save running on --save {save_dir}? "
              f"The request stays in {path} (remove it to withdraw it)", file=sys.stderr)
        return 3
    if not answer.done:
        print(f"rollback.sh: refused by the job: {answer.message}", file=sys.stderr)
        return 2
    print(answer.message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
