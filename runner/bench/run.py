"""`bench`: the jobs of (prompts x seeds x methods) through the backends, into the store, with a progress line.

The queue is one list of pending jobs; each backend's thread takes the next one when it has room, so a faster
server takes more. Jobs come back as outcomes on one queue that this (main) thread stores, so an image and its
metrics are written together. Ctrl-C stops: servers drop our waiting prompts and interrupt the running ones,
the embedded executor is interrupted; everything that finished is stored, the rest stays pending for the next
run of the same command.
"""
from __future__ import annotations

import collections
import queue
import re
import sys
import threading
import time
from pathlib import Path

from . import backends as backends_module
from . import methods as methods_module
from . import prompts as prompts_module
from .metrics import ClipError, ClipScorer, attention_scalars
from .store import JobRow, Store


class BenchError(Exception):
    """A problem the user can fix; printed without a traceback."""


NO_MODEL = ("which model? give --ckpt NAME (a checkpoint in ComfyUI's models/checkpoints, or a file path when jobs "
            "run in this process), --loader NODE (a node without inputs that outputs MODEL, CLIP, VAE) or --demo "
            "(tiny random models, in this process)")


def slug(text: str, length: int = 60) -> str:
    value = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"
    return value[:length]


def image_path(job: JobRow) -> str:
    """Where a job's picture goes, relative to the store's folder."""
    return f"images/{slug(job.method, 30)}-{job.settings_hash[:8]}/{slug(job.prompt)}/seed{job.seed:05d}.png"


class Scheduler:
    """Shared by the backends' threads: the pending jobs, what each backend took, the outcomes."""

    def __init__(self, store: Store, methods: dict[str, methods_module.Method], say, steal: bool = True):
        self.store = store
        self.methods = methods  # settings_hash -> Method
        self.say = say
        self.steal = steal
        self.pending: collections.deque[JobRow] = collections.deque()
        self.outstanding: set[int] = set()  # taken by a backend, not yet stored
        self.outcomes: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.backends: list = []
        self._lock = threading.RLock()

    def item(self, job: JobRow):
        method = self.methods[job.settings_hash]
        return job, method, method.render(job.prompt, job.subjects, job.seed)

    def take(self, backend):
        """The next job for `backend`, or None. With nothing pending, an idle server may take a job that waits in
        another server's queue (see ServerBackend.release_one)."""
        if self.stopping.is_set() or backend.dead:
            return None
        with self._lock:
            if self.pending:
                job = self.pending.popleft()
                self.outstanding.add(job.id)
                return self.item(job)
        if not self.steal or backend.inflight_count():
            return None
        for other in sorted(self.backends, key=lambda b: -b.inflight_count()):
            if other is backend or other.dead:
                continue
            released = other.release_one(backend.seconds_per_job())
            if released:
                job, _method, remote_id = released
                self.store.mark_pending(job.id, remote_id, "released", f"moved from {other.name} to {backend.name}")
                return self.item(job)
        return None

    def mark_sent(self, job: JobRow, backend, remote_id: str) -> None:
        self.store.mark_sent(job.id, backend.name, remote_id)

    def give_back(self, job: JobRow, remote_id: str | None, outcome: str, message: str) -> None:
        self.store.mark_pending(job.id, remote_id, outcome, message)
        with self._lock:
            self.outstanding.discard(job.id)
            if not self.stopping.is_set():
                self.pending.appendleft(job)

    def report(self, outcome) -> None:
        self.outcomes.put(outcome)

    def resolved(self, job: JobRow, requeue: bool) -> None:
        with self._lock:
            self.outstanding.discard(job.id)
            if requeue and not self.stopping.is_set():
                self.pending.appendleft(job)

    def settled(self) -> bool:
        with self._lock:
            return not self.pending and not self.outstanding


class Progress:
    """One status line: done / total, a bar, throughput per backend and the ETA; redrawn in place on a terminal,
    else printed every `interval` seconds."""

    def __init__(self, total: int, done_before: int, backends: list, stream=None, interval: float = 15.0):
        self.total = total
        self.done_before = done_before
        self.done = 0
        self.failed = 0
        self.backends = backends
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._width = 0

    def line(self) -> str:
        finished = self.done_before + self.done + self.failed
        width = 24
        filled = int(width * finished / self.total) if self.total else width
        parts = [f"{finished}/{self.total} done" + (f" ({self.failed} failed)" if self.failed else ""),
                 f"[{'#' * filled}{'.' * (width - filled)}]"]
        rates = [b.rate_per_minute() for b in self.backends if not b.dead]
        total_rate = sum(r for r in rates if r)
        left = self.total - finished
        if total_rate and left:
            parts.append(f"ETA {format_seconds(60.0 * left / total_rate)}")
        for backend in self.backends:
            rate = backend.rate_per_minute()
            state = "gone" if backend.dead else f"{backend.inflight_count()} in flight"
            parts.append(f"{backend.name}: {backend.done} done, {state}" + (f", {rate:.1f}/min" if rate else ""))
        return " | ".join(parts)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 0.5:
                text = self.line()
                self.stream.write("\r" + text.ljust(self._width))
                self._width = len(text)
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def end(self) -> None:
        self.update(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------- setting up

def _settings(options, catalog) -> methods_module.RunSettings:
    explicit = {name for name in ("steps", "size") if getattr(options, name) is not None}
    if options.ckpt:
        explicit.add("ckpt")
    if options.demo:
        loader = {"class_type": methods_module.DEMO_CHECKPOINT, "inputs": {"family": options.family or "sd15",
                                                                            "seed": 0}}
    elif options.loader:
        if catalog.input_types(options.loader) is None:
            raise BenchError(f"--loader {options.loader}: {catalog.where} has no such node type")
        loader = {"class_type": options.loader, "inputs": {}}
    elif options.ckpt:
        loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": options.ckpt}}
    else:  # only workflow methods: they bring their own loaders
        loader = {"class_type": "", "inputs": {}}
    width, height = options.size or (512, 512)
    overrides = {}
    for assignment in options.guidance or []:  # one key=value each (a value may hold commas: refinement)
        key, equals, value = assignment.partition("=")
        if not equals or not key.strip():
            raise BenchError(f"--guidance {assignment!r} is not KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return methods_module.RunSettings(
        loader=loader, steps=options.steps or 50, width=width, height=height, cfg=options.cfg,
        sampler=options.sampler, scheduler=options.scheduler, negative=options.negative,
        retention_from=options.retention_from, guidance_overrides=overrides, explicit=frozenset(explicit))


def _embedded(options, say):
    from .. import cli
    try:
        host = cli.find_host(options.comfyui)
        cli.boot_host(host, force_cpu=options.cpu, verbose=options.verbose)
    except cli.CliError as error:
        raise BenchError(str(error)) from None
    if options.demo:
        cli.register_demo_nodes()
        say(cli.DEMO_BANNER)
    if options.ckpt and Path(options.ckpt).expanduser().is_file():
        try:
            options.ckpt = cli.override_checkpoint({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {
                "ckpt_name": ""}}}, options.ckpt)
        except cli.CliError as error:
            raise BenchError(str(error)) from None
    import comfy.model_management
    say(f"jobs run in this process (ComfyUI {host}, device {comfy.model_management.get_torch_device()})")
    return backends_module.EmbeddedBackend()


def _servers(options, say) -> list:
    usable = []
    for url in options.server:
        backend = backends_module.ServerBackend(url, slots=options.jobs_per_server, dead_after=options.dead_after,
                                                poll_seconds=options.poll)
        if any(other.url == backend.url for other in usable):
            say(f"note: server {backend.name} is given twice; used once")
            continue
        try:
            backend.check()
        except backends_module.ServerError as error:
            say(f"warning: {error}; left out")
            continue
        usable.append(backend)
    if not usable:
        raise BenchError("no usable server: " + ("every --server was left out (see above)" if options.server else
                                                 "none given"))
    return usable


def _reconcile(store: Store, jobs: list[JobRow], methods: dict, servers: list, say) -> tuple[list, list[JobRow]]:
    """Jobs an earlier run left `sent`: collected if their server finished them, followed if it still holds
    them, sent again otherwise. Returns the outcomes to store and the jobs adopted by a server."""
    by_name = {backend.name: backend for backend in servers}
    outcomes, adopted = [], []
    for job in jobs:
        if job.state != "sent":
            continue
        backend = by_name.get(job.backend or "")
        probe = backend
        if probe is None and job.backend and job.backend != "this process":
            probe = backends_module.ServerBackend(job.backend, dead_after=0)
        if probe is None:
            store.mark_pending(job.id, job.remote_id, "lost", "the earlier run ended before it finished")
            continue
        try:
            state, item = probe.status_of(job.remote_id)
            if state == "finished":
                entry = backends_module._InFlight(job, methods[job.settings_hash], time.monotonic())
                outcomes.append(probe._collect(entry, job.remote_id, item))
                probe.forget(job.remote_id)
                continue
            if state == "queued" and backend is not None:
                backend.adopt(job, methods[job.settings_hash], job.remote_id)
                adopted.append(job)
                continue
            if state == "queued":
                probe.cancel([job.remote_id])
        except Exception as error:  # noqa: BLE001  (any failure to ask: send it again)
            store.mark_pending(job.id, job.remote_id, "lost", f"{job.backend} cannot tell ({error})")
            continue
        store.mark_pending(job.id, job.remote_id, "lost", f"{job.backend} no longer holds it")
    if outcomes or adopted:
        say(f"resuming: {len(outcomes)} job(s) an earlier run sent had finished, {len(adopted)} still in a "
            "server's queue")
    return outcomes, adopted


# ---------------------------------------------------------------- the command

class _Stored:
    """Writes outcomes into the store (and the images beside it), with the CLIP metrics when asked."""

    def __init__(self, store: Store, scheduler: Scheduler, scorer: ClipScorer | None, say):
        self.store, self.scheduler, self.scorer, self.say = store, scheduler, scorer, say
        self.errors: dict[str, list[str]] = {}

    def __call__(self, outcome, progress: Progress | None, backends: dict) -> None:
        job = outcome.job
        if outcome.requeue:
            self.store.mark_pending(job.id, outcome.remote_id, outcome.requeue, outcome.error)
            self.scheduler.resolved(job, requeue=True)
            return
        if not outcome.ok:
            self.store.mark_failed(job.id, outcome.remote_id, outcome.error)
            self.scheduler.resolved(job, requeue=False)
            first = outcome.error not in self.errors
            self.errors.setdefault(outcome.error, []).append(job.label)
            if first:
                self.say(f"failed: {job.label} on {outcome.backend}: {outcome.error}")
            if progress:
                progress.failed += 1
            return
        relative = image_path(job)
        target = self.store.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        partial.write_bytes(outcome.image)
        partial.replace(target)
        values = attention_scalars(outcome.attention)
        if self.scorer is not None:
            values.update(self.scorer.score(outcome.image, job.prompt))
        stored = self.store.mark_done(job.id, outcome.remote_id, relative, values, outcome.attention, outcome.seconds)
        self.scheduler.resolved(job, requeue=False)
        backend = backends.get(outcome.backend)
        if stored and backend is not None:
            backend.done += 1
        if stored and progress:
            progress.done += 1


def score_missing(store: Store, scorer: ClipScorer, job_ids: list[int] | None, say) -> int:
    """CLIP metrics for done jobs that lack them (or were scored with another CLIP model)."""
    if store.get_meta("clip_model") not in (None, scorer.identity):
        say(f"CLIP: the store's clip_* metrics come from {store.get_meta('clip_model')}; recomputing them with "
            f"{scorer.identity}")
        store.delete_metrics("clip_")
    store.set_meta("clip_model", scorer.identity)
    rows = store.query("SELECT id, prompt, image FROM jobs WHERE state = 'done' AND id NOT IN "
                       "(SELECT job_id FROM metrics WHERE name = 'clip_full')")
    wanted = None if job_ids is None else set(job_ids)
    rows = [row for row in rows if wanted is None or row[0] in wanted]
    for job_id, prompt, image in rows:
        path = store.folder / image
        if path.is_file():
            store.set_metrics(job_id, scorer.score(str(path), prompt))
    if rows:
        say(f"CLIP: scored {len(rows)} stored image(s) that had no CLIP metrics")
    return len(rows)


def run(options, say) -> int:
    try:
        prompt_set, problems = prompts_module.load_prompt_set(options.prompts)
        seeds = prompts_module.parse_seeds(options.seeds)
    except (prompts_module.PromptSetError, ValueError) as error:
        raise BenchError(str(error)) from None
    for problem in problems:
        say(f"prompt left out: {problem}")
    categories = [c.strip() for c in options.categories.split(",")] if options.categories else None
    chosen = prompts_module.pick(prompt_set, categories, options.num_prompts)
    if not chosen:
        raise BenchError("no prompt to run" + (f" in categories {', '.join(categories)}" if categories else ""))
    if options.demo and options.server:
        raise BenchError("--demo's tiny models exist only in this process; on servers use --ckpt or --loader")
    if not (options.demo or options.loader or options.ckpt) and not all(
            methods_module.is_workflow_spec(spec) for spec in options.method or ["plain"]):
        raise BenchError(NO_MODEL)

    scorer = None
    if options.clip:
        try:
            scorer = ClipScorer(options.clip)
        except ClipError as error:
            raise BenchError(str(error)) from None

    servers = _servers(options, say) if options.server else []
    embedded = None if servers else _embedded(options, say)
    backends = servers or [embedded]
    try:
        catalog = backends[0].catalog()
        settings = _settings(options, catalog)
        try:
            methods = [methods_module.build_method(spec, settings, catalog)
                       for spec in (options.method or methods_module.DEFAULT_METHODS)]
        except methods_module.MethodError as error:
            raise BenchError(str(error)) from None
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise BenchError(f"methods {', '.join(names)}: each needs its own name")
        if embedded is not None:
            for method in methods:
                problem = methods_module.missing_checkpoint(method, catalog)
                if problem:
                    raise BenchError(problem)
        if servers:
            reference = catalog.input_types(methods_module.GUIDANCE)
            for backend in list(servers):
                try:
                    backend.check_nodes(methods)
                    if backend is not servers[0] and backend.object_info(methods_module.GUIDANCE) != reference:
                        raise backends_module.ServerError(
                            f"server {backend.name} runs another version of the pack than {servers[0].name} (its "
                            "Attention Guidance node's inputs differ), so its results would not match")
                except backends_module.ServerError as error:
                    say(f"warning: {error}; left out")
                    servers.remove(backend)
            if not servers:
                raise BenchError("no usable server left (see above)")
            backends = servers
        for method in methods:
            say(f"method {method.name} [{method.settings_hash[:8]}]: {method.description}")
        return _execute(options, say, chosen, seeds, methods, backends, servers, scorer)
    finally:
        if embedded is not None:
            embedded.close()


def _execute(options, say, chosen, seeds, methods, backends, servers, scorer) -> int:
    store = Store(options.out)
    try:
        for method in methods:
            store.add_settings(method)
        store.add_jobs([(p.text, seed, m.name, m.settings_hash, p.category, p.subjects)
                        for p in chosen for seed in seeds for m in methods])
        by_hash = {m.settings_hash: m for m in methods}
        wanted = {(p.text, seed, m.settings_hash) for p in chosen for seed in seeds for m in methods}
        placeholders = ",".join("?" * len(by_hash))
        jobs = [job for job in store.jobs(f"settings_hash IN ({placeholders})", tuple(by_hash))
                if (job.prompt, job.seed, job.settings_hash) in wanted]
        scheduler = Scheduler(store, by_hash, say, steal=not options.no_steal)
        scheduler.backends = backends
        names = {backend.name: backend for backend in backends}
        storing = _Stored(store, scheduler, scorer, say)
        if scorer is not None:
            score_missing(store, scorer, [job.id for job in jobs], say)
        outcomes, adopted = _reconcile(store, jobs, by_hash, servers, say)
        for outcome in outcomes:
            scheduler.outstanding.add(outcome.job.id)
            storing(outcome, None, names)
        jobs = [store.job(job.id) for job in jobs]
        adopted_ids = {job.id for job in adopted}
        scheduler.outstanding.update(adopted_ids)
        to_run = [job for job in jobs if job.state in ("pending", "failed") and job.id not in adopted_ids]
        already = sum(job.state == "done" for job in jobs)
        scheduler.pending.extend(to_run)
        say(f"{len(jobs)} jobs ({len(chosen)} prompts x {len(seeds)} seeds x {len(methods)} methods): {already} "
            f"already done, {len(to_run) + len(adopted)} to run on {', '.join(b.name for b in backends)}; store "
            f"{store.path}")
        progress = Progress(len(jobs), already, backends, interval=options.progress_interval)
        if to_run or adopted:
            interrupted = _loop(scheduler, backends, storing, progress, names, say)
        else:
            interrupted = False
        progress.end()
        counts = store.counts([job.id for job in jobs])
        left = counts.get("pending", 0) + counts.get("sent", 0)
        for error, labels in storing.errors.items():
            say(f"{len(labels)} job(s) failed with: {error}\n  e.g. " + "; ".join(labels[:3]))
        for backend in backends:
            rate = backend.rate_per_minute()
            if backend.done:
                say(f"{backend.name}: {backend.done} jobs" + (f", {rate:.2f} jobs/min" if rate else ""))
        say(f"done: {counts.get('done', 0)} of {len(jobs)} jobs"
            + (f", {counts.get('failed', 0)} failed" if counts.get("failed") else "")
            + (f", {left} left" if left else ""))
        if interrupted:
            say(f"stopped; run the same command again to resume ({left} left)")
            return 130
        if left:
            say("some jobs could not run (no server left); run the same command again to resume")
            return 1
        return 1 if counts.get("failed") else 0
    finally:
        store.close()


def _loop(scheduler, backends, storing, progress, names, say) -> bool:
    def work(backend):
        try:
            backend.run(scheduler)
        except Exception as error:  # noqa: BLE001  (a backend's bug must not hang the run)
            backend.dead = True
            say(f"{backend.name} stopped after an error: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(backend,), name=f"bench {backend.name}", daemon=True)
               for backend in backends]
    for thread in threads:
        thread.start()
    interrupted = False
    outcome = None  # the outcome being stored: stored again if Ctrl-C came in the middle (a write is atomic)
    try:
        while True:
            try:
                outcome = scheduler.outcomes.get(timeout=0.2)
            except queue.Empty:
                outcome = None
            if outcome is not None:
                storing(outcome, progress, names)
                outcome = None
                progress.update()
                continue
            progress.update()
            if not any(thread.is_alive() for thread in threads) and scheduler.outcomes.empty():
                break
    except KeyboardInterrupt:
        interrupted = True
        if outcome is not None:
            storing(outcome, progress, names)
        say("\nstopping: cancelling the jobs in flight (Ctrl-C again to leave at once) ...")
        scheduler.stopping.set()
        try:
            for backend in backends:
                backend.stop()
            deadline = time.monotonic() + 30
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                try:
                    storing(scheduler.outcomes.get(timeout=0.2), progress, names)
                except queue.Empty:
                    pass
        except KeyboardInterrupt:
            say("left at once: jobs still in flight are sent again on the next run")
    while True:
        try:
            storing(scheduler.outcomes.get_nowait(), progress, names)
        except queue.Empty:
            break
    return interrupted
