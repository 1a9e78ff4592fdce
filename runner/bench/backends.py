"""Where the bench's jobs run: this process's ComfyUI (the executor `run` uses), or running ComfyUI servers.

Each backend runs in its own thread and pulls jobs from the scheduler (run.py) while it has room: the embedded
one runs one job at a time; a server keeps `slots` jobs in its queue (one running, the next ones waiting, so it
never idles between jobs) and polls /queue and /history for them. A finished job's picture comes from /view, its
attention metrics from the Attention Metrics node's UI output in /history, and its history entry is deleted.

A server that stops answering for `dead_after` seconds is given up: its jobs go back to the queue for the
others. A server whose queue holds one of our jobs that has not started, while another server has nothing to
do, gives it up to that one (deleted from its queue through /queue, then checked gone) when the idle server is
expected to finish it sooner. On stop (Ctrl-C) a server's waiting jobs are deleted from its queue and its running
one interrupted (/interrupt with the prompt id, so other users' prompts are left alone); what finished is kept.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .methods import NodeCatalog, missing_checkpoint
from .store import JobRow

PACK_NODES = ("AttnGuideTextEncode", "AttnGuideGuidance", "AttnGuideKSampler", "AttnGuideMetrics")


@dataclass
class Outcome:
    job: JobRow
    backend: str
    remote_id: str | None
    ok: bool = False
    image: bytes | None = None
    attention: dict | None = None
    error: str | None = None
    seconds: float | None = None
    requeue: str | None = None  # the job goes back to the queue: why ("interrupted", "lost")


def format_validation(answer: dict, graph: dict | None = None) -> str:
    """ComfyUI's answer to a prompt that failed validation, in one line per problem."""
    error = answer.get("error") or {}
    if isinstance(error, str):
        return error
    lines = [str(error.get("message") or error) + (f" ({error['details']})" if error.get("details") else "")]
    for node_id, entry in (answer.get("node_errors") or {}).items():
        kind = entry.get("class_type") or (graph or {}).get(node_id, {}).get("class_type", "?")
        for problem in entry.get("errors", []):
            detail = problem.get("details")
            lines.append(f"node {node_id} ({kind}): {problem.get('message')}" + (f": {detail}" if detail else ""))
    return "; ".join(lines)


def _execution_error(messages: list) -> tuple[str | None, bool]:
    """(error text, interrupted) from an executor's status messages."""
    for event, data in messages or []:
        if event == "execution_interrupted":
            return "interrupted", True
        if event == "execution_error":
            message = str(data.get("exception_message", "")).strip() or data.get("exception_type", "error")
            return f"node {data.get('node_id')} ({data.get('node_type')}): {message}", False
    return None, False


def _execution_seconds(messages: list) -> float | None:
    stamps = {event: data.get("timestamp") for event, data in messages or [] if isinstance(data, dict)}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return (end - start) / 1000.0 if start and end else None


class Backend:
    name = "backend"
    slots = 1

    def __init__(self):
        self.done = 0
        self.job_seconds: list[float] = []  # wall time per finished job, as this backend delivered them
        self.first_sent: float | None = None
        self.finished = False
        self.dead = False
        self.lock = threading.RLock()

    def inflight_count(self) -> int:
        return 0

    def rate_per_minute(self) -> float | None:
        if not self.done or self.first_sent is None:
            return None
        return 60.0 * self.done / max(time.monotonic() - self.first_sent, 1e-6)

    def seconds_per_job(self) -> float | None:
        rate = self.rate_per_minute()
        return None if rate is None else 60.0 / rate

    def release_one(self, seconds_per_job: float | None):
        """A job of ours waiting in this backend's queue, given up for an idle backend: (job, method, remote id)."""
        return None

    def stop(self):
        pass


# ---------------------------------------------------------------- this process

class _Quiet:
    """What PromptExecutor needs of a server when none runs."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


class EmbeddedBackend(Backend):
    """Jobs run one after another through this process's ComfyUI (validate_prompt + PromptExecutor, with the
    classic cache, so the model loads once). Previews go to a scratch temp folder, read back and removed."""
    name = "this process"

    def __init__(self):
        super().__init__()
        import execution
        import folder_paths
        self._execution = execution
        self._folder_paths = folder_paths
        classic = getattr(getattr(execution, "CacheType", None), "CLASSIC", None)
        self._executor = (execution.PromptExecutor(_Quiet()) if classic is None else execution.PromptExecutor(
            _Quiet(), cache_type=classic, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0}))
        self._scratch = Path(tempfile.mkdtemp(prefix="attn_guide_bench_"))
        self._saved_temp = folder_paths.get_temp_directory()
        folder_paths.set_temp_directory(str(self._scratch))
        import comfy.utils
        self._saved_progress_bar = comfy.utils.PROGRESS_BAR_ENABLED
        comfy.utils.set_progress_bar_enabled(False)  # the bench's own progress line instead of tqdm's per job
        self._running = False

    def catalog(self) -> NodeCatalog:
        from .methods import local_catalog
        return local_catalog()

    def inflight_count(self) -> int:
        return int(self._running)

    def close(self):
        import comfy.model_management
        import comfy.utils
        comfy.model_management.interrupt_current_processing(False)  # a stop that came after the last job
        comfy.utils.set_progress_bar_enabled(self._saved_progress_bar)
        self._folder_paths.set_temp_directory(self._saved_temp)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def stop(self):
        import comfy.model_management
        if self._running:
            comfy.model_management.interrupt_current_processing(True)

    def run(self, scheduler):
        import asyncio
        while not scheduler.stopping.is_set():
            item = scheduler.take(self)
            if item is None:
                if scheduler.settled():
                    break
                time.sleep(0.05)
                continue
            job, method, graph = item
            remote_id = str(uuid.uuid4())
            scheduler.mark_sent(job, self, remote_id)
            if self.first_sent is None:
                self.first_sent = time.monotonic()
            started = time.perf_counter()
            self._running = True
            try:
                valid = asyncio.run(self._execution.validate_prompt(remote_id, graph, None))
                if not valid[0]:
                    scheduler.report(Outcome(job, self.name, remote_id, error=format_validation(
                        {"error": valid[1], "node_errors": valid[3]}, graph)))
                    continue
                self._executor.execute(graph, remote_id, {}, valid[2])
            except Exception as error:  # noqa: BLE001  (ComfyUI's own failure: this job fails, the next goes on)
                scheduler.report(Outcome(job, self.name, remote_id, error=f"{type(error).__name__}: {error}"))
                continue
            finally:
                self._running = False
            error, interrupted = _execution_error(self._executor.status_messages)
            if interrupted:
                import comfy.model_management
                comfy.model_management.interrupt_current_processing(False)
                scheduler.report(Outcome(job, self.name, remote_id, requeue="interrupted", error="interrupted"))
                continue
            if error or not self._executor.success:
                scheduler.report(Outcome(job, self.name, remote_id, error=error or "the run did not finish"))
                continue
            outputs = getattr(self._executor, "history_result", {}).get("outputs", {})
            scheduler.report(self._outcome(job, method, remote_id, outputs, time.perf_counter() - started))
        self.finished = True

    def _outcome(self, job, method, remote_id, outputs, seconds) -> Outcome:
        images = (outputs.get(method.image_node) or {}).get("images") or []
        if not images:
            return Outcome(job, self.name, remote_id, error=f"node {method.image_node} gave no picture")
        image = images[0]
        base = self._folder_paths.get_directory_by_type(image.get("type", "output"))
        path = Path(base) / image.get("subfolder", "") / image["filename"]
        blob = path.read_bytes()
        if image.get("type") == "temp":
            path.unlink(missing_ok=True)
        attention = None
        if method.metrics_node is not None:
            attention = ((outputs.get(method.metrics_node) or {}).get("attention_metrics") or [None])[0]
        return Outcome(job, self.name, remote_id, ok=True, image=blob, attention=attention, seconds=seconds)


# ---------------------------------------------------------------- a ComfyUI server

class ServerError(Exception):
    """The server cannot be used (unreachable, no pack, a missing model): the message says which and why."""


@dataclass
class _InFlight:
    job: JobRow
    method: object
    sent: float
    started: float | None = None
    missing: int = 0
    releasing: bool = False
    position: int = 0  # jobs ahead of it in the server's queue at the last poll (0: running)


class ServerBackend(Backend):
    """A running ComfyUI server at `url` with the pack installed: up to `slots` of our jobs in its queue."""

    def __init__(self, url: str, slots: int = 2, poll_seconds: float = 0.25, dead_after: float = 20.0,
                 timeout: tuple = (5.0, 120.0)):
        super().__init__()
        import requests
        self._requests = requests
        self.url = url.strip().rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.name = self.url[len("http://"):] if self.url.startswith("http://") else self.url
        self.slots = max(1, int(slots))
        self.poll_seconds = poll_seconds
        self.dead_after = dead_after
        self.timeout = timeout
        self.client_id = f"attn-guide-bench-{uuid.uuid4()}"
        self.inflight: dict[str, _InFlight] = {}
        self.running_ids: set[str] = set()
        self._session = requests.Session()
        self._failing_since: float | None = None
        self._object_info: dict[str, dict | None] = {}

    # ------------------------------------------------------------ HTTP

    def _get(self, path: str, session=None, **params):
        response = (session or self._session).get(self.url + path, params=params or None, timeout=self.timeout)
        response.raise_for_status()
        return response

    def _post(self, path: str, body: dict, session=None):
        return (session or self._session).post(self.url + path, json=body, timeout=self.timeout)

    def _unreachable(self, error) -> bool:
        return isinstance(error, (self._requests.ConnectionError, self._requests.Timeout))

    # ------------------------------------------------------------ checks

    def object_info(self, class_type: str) -> dict | None:
        """The inputs of a node type as /object_info gives them; None if the server does not have it."""
        if class_type not in self._object_info:
            try:
                answer = self._get(f"/object_info/{class_type}").json()
            except self._requests.RequestException as error:
                raise ServerError(f"server {self.name}: cannot read /object_info/{class_type}: {error}") from None
            info = answer.get(class_type) if isinstance(answer, dict) else None
            self._object_info[class_type] = None if info is None else info.get("input") or {}
        return self._object_info[class_type]

    def catalog(self) -> NodeCatalog:
        return NodeCatalog(self.object_info, f"server {self.name}")

    def check(self) -> None:
        """Raises ServerError unless the server answers as a ComfyUI with the attention guidance pack."""
        try:
            stats = self._get("/system_stats").json()
        except self._requests.HTTPError as error:
            raise ServerError(f"server {self.name}: answers, but not as ComfyUI ({error})") from None
        except self._requests.RequestException as error:
            reason = "nothing answers there" if self._unreachable(error) else str(error)
            raise ServerError(f"server {self.name}: cannot connect ({reason}); is ComfyUI running at {self.url}?"
                              ) from None
        except ValueError:
            raise ServerError(f"server {self.name}: answers, but not as ComfyUI (/system_stats is not JSON)") from None
        missing = [node for node in PACK_NODES if self.object_info(node) is None]
        if missing:
            version = (stats.get("system") or {}).get("comfyui_version", "?") if isinstance(stats, dict) else "?"
            raise ServerError(f"server {self.name} (ComfyUI {version}): the attention guidance pack is not installed "
                              f"there, or too old (/object_info lacks {', '.join(missing)}); put this pack into its "
                              "custom_nodes/ and restart it")

    def check_nodes(self, methods) -> None:
        for method in methods:
            missing = sorted(t for t in method.node_types() if self.object_info(t) is None)
            if missing:
                raise ServerError(f"server {self.name}: method {method.name!r} needs node types it does not have: "
                                  f"{', '.join(missing)}")
            problem = missing_checkpoint(method, self.catalog())
            if problem:
                raise ServerError(problem)

    # ------------------------------------------------------------ the worker

    def inflight_count(self) -> int:
        return len(self.inflight)

    def run(self, scheduler):
        try:
            self._run(scheduler)
        except Exception as error:  # noqa: BLE001  (a bug or an odd answer: give the server up, keep its jobs)
            self.dead = True
            with self.lock:
                lost = list(self.inflight.items())
                self.inflight.clear()
            for remote_id, entry in lost:
                scheduler.give_back(entry.job, remote_id, "lost", f"{self.name}: {error}")
            scheduler.say(f"server {self.name} left out after an error ({type(error).__name__}: {error}); its "
                          f"{len(lost)} jobs go to the other servers")
        finally:
            self.finished = True

    def _run(self, scheduler):
        while True:
            if scheduler.stopping.is_set():
                self._stop_jobs(scheduler)
                return
            while not self.dead and len(self.inflight) < self.slots:
                item = scheduler.take(self)
                if item is None or not self._send(scheduler, *item):
                    break
            if self.dead:
                return
            if not self.inflight:
                if scheduler.settled():
                    return
                time.sleep(self.poll_seconds)
                continue
            self._poll(scheduler)
            if self.dead:
                return
            time.sleep(self.poll_seconds)

    def adopt(self, job: JobRow, method, remote_id: str) -> None:
        """A job an earlier run sent here, still in this server's queue: followed as if sent now."""
        with self.lock:
            self.inflight[remote_id] = _InFlight(job, method, time.monotonic())
        if self.first_sent is None:
            self.first_sent = time.monotonic()

    def _send(self, scheduler, job: JobRow, method, graph: dict) -> bool:
        """Queues the job on the server; False if the server did not take it (the job went back)."""
        remote_id = str(uuid.uuid4())
        scheduler.mark_sent(job, self, remote_id)
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        try:
            response = self._post("/prompt", {"prompt": graph, "prompt_id": remote_id, "client_id": self.client_id})
        except self._requests.RequestException as error:
            scheduler.give_back(job, remote_id, "lost", f"could not send it to {self.name}: {error}")
            self._connection_failed(scheduler, error)
            return False
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code == 400:
            scheduler.report(Outcome(job, self.name, remote_id, error=format_validation(answer, graph)))
            return True
        if response.status_code != 200:
            scheduler.give_back(job, remote_id, "lost", f"{self.name} answered /prompt with {response.status_code}")
            self._connection_failed(scheduler, f"HTTP {response.status_code}")
            return False
        given = str(answer.get("prompt_id") or remote_id)
        if given != remote_id:  # a ComfyUI that picks its own ids
            scheduler.store.mark_pending(job.id, remote_id, "resent", f"the server named it {given}")
            scheduler.store.mark_sent(job.id, self.name, given)
        with self.lock:
            self.inflight[given] = _InFlight(job, method, time.monotonic())
        return True

    def _connection_failed(self, scheduler, error) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            return
        if now - self._failing_since < self.dead_after or self.dead:
            return
        self.dead = True
        with self.lock:
            lost = list(self.inflight.items())
            self.inflight.clear()
        for remote_id, entry in lost:
            scheduler.give_back(entry.job, remote_id, "lost", f"{self.name} stopped answering")
        scheduler.say(f"server {self.name} stopped answering for {self.dead_after:.0f} s ({error}); "
                      f"{len(lost)} of its jobs go to the other servers")

    def _poll(self, scheduler) -> None:
        try:
            queue = self._get("/queue").json()
        except self._requests.RequestException as error:
            self._connection_failed(scheduler, error)
            return
        running = [item[1] for item in queue.get("queue_running", [])]
        pending = sorted(queue.get("queue_pending", []), key=lambda item: item[0])
        pending_ids = [item[1] for item in pending]
        self.running_ids = set(running)
        with self.lock:
            entries = [(rid, entry) for rid, entry in self.inflight.items() if not entry.releasing]
        for remote_id, entry in entries:
            if remote_id in self.running_ids or remote_id in pending_ids:
                entry.missing = 0
                if remote_id in self.running_ids:
                    entry.position = 0
                    entry.started = entry.started or time.monotonic()
                else:
                    entry.position = len(running) + pending_ids.index(remote_id)
                continue
            try:
                history = self._get(f"/history/{remote_id}").json()
                item = history.get(remote_id)
                outcome = self._collect(entry, remote_id, item) if item else None
            except self._requests.RequestException as error:
                self._connection_failed(scheduler, error)
                return
            if outcome is None:
                entry.missing += 1
                if entry.missing >= 3:
                    with self.lock:
                        self.inflight.pop(remote_id, None)
                    scheduler.give_back(entry.job, remote_id, "lost", f"{self.name} no longer knows it (restarted?)")
                continue
            with self.lock:
                self.inflight.pop(remote_id, None)
            scheduler.report(outcome)
            self.forget(remote_id)
        self._failing_since = None

    def _collect(self, entry: _InFlight, remote_id: str, item: dict, session=None) -> Outcome:
        """The outcome of a job the server's history holds (the picture fetched from /view)."""
        status = item.get("status") or {}
        messages = status.get("messages") or []
        error, interrupted = _execution_error(messages)
        if interrupted:
            return Outcome(entry.job, self.name, remote_id, requeue="interrupted", error="interrupted on the server")
        if status.get("status_str") != "success" or error:
            return Outcome(entry.job, self.name, remote_id, error=error or f"status {status.get('status_str')!r}")
        outputs = item.get("outputs") or {}
        method = entry.method
        images = (outputs.get(method.image_node) or {}).get("images") or []
        if not images:
            return Outcome(entry.job, self.name, remote_id, error=f"node {method.image_node} gave no picture")
        image = images[0]
        blob = self._get("/view", session, filename=image["filename"], subfolder=image.get("subfolder", ""),
                         type=image.get("type", "output")).content
        attention = None
        if method.metrics_node is not None:
            attention = ((outputs.get(method.metrics_node) or {}).get("attention_metrics") or [None])[0]
        return Outcome(entry.job, self.name, remote_id, ok=True, image=blob, attention=attention,
                       seconds=_execution_seconds(messages))

    def status_of(self, remote_id: str) -> tuple[str, dict | None]:
        """('queued' | 'finished' | 'unknown', history item) of a prompt id on this server."""
        queue = self._get("/queue").json()
        ids = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
        if remote_id in ids:
            return "queued", None
        item = self._get(f"/history/{remote_id}").json().get(remote_id)
        return ("finished", item) if item else ("unknown", None)

    def forget(self, remote_id: str) -> None:
        """Deletes a collected prompt from the server's history (the server keeps up to 10000 otherwise)."""
        try:
            self._post("/history", {"delete": [remote_id]})
        except self._requests.RequestException:
            pass

    def cancel(self, remote_ids: list[str], session=None) -> None:
        """Deletes these prompts from the server's queue and interrupts the one of them that runs."""
        self._post("/queue", {"delete": list(remote_ids)}, session)
        queue = self._get("/queue", session).json()
        for item in queue.get("queue_running", []):
            if item[1] in remote_ids:
                self._post("/interrupt", {"prompt_id": item[1]}, session)

    def release_one(self, seconds_per_job: float | None):
        """Gives up one of our jobs that waits in this server's queue, for an idle server that needs about
        `seconds_per_job` for it (None: unknown): the (job, method) or None."""
        own = self.seconds_per_job()
        with self.lock:
            waiting = [(entry.position, rid, entry) for rid, entry in self.inflight.items()
                       if rid not in self.running_ids and entry.started is None and not entry.releasing
                       and entry.position > 0]
            if not waiting:
                return None
            position, remote_id, entry = max(waiting, key=lambda w: w[0])
            # here it starts after `position` jobs and takes one more; there it starts now
            if own is not None and seconds_per_job is not None and seconds_per_job >= own * (position + 1):
                return None
            entry.releasing = True
        session = self._requests.Session()
        try:
            self._post("/queue", {"delete": [remote_id]}, session)
            queue = self._get("/queue", session).json()
            still = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
            gone = remote_id not in still and not self._get(f"/history/{remote_id}", session).json().get(remote_id)
        except self._requests.RequestException:
            gone = False
        finally:
            session.close()
        with self.lock:
            if not gone:
                entry.releasing = False
                return None
            self.inflight.pop(remote_id, None)
        return entry.job, entry.method, remote_id

    def _stop_jobs(self, scheduler) -> None:
        """Ctrl-C: our waiting jobs leave the server's queue, the running one is interrupted; what finished in
        the meantime is collected."""
        with self.lock:
            entries = dict(self.inflight)
        if not entries:
            return
        try:
            self.cancel(list(entries))
        except self._requests.RequestException:
            pass
        deadline = time.monotonic() + 10.0
        while entries and time.monotonic() < deadline:
            for remote_id, entry in list(entries.items()):
                try:
                    state, item = self.status_of(remote_id)
                except self._requests.RequestException:
                    state, item = "unknown", None
                if state == "queued":
                    continue
                outcome = self._collect(entry, remote_id, item) if item else Outcome(
                    entry.job, self.name, remote_id, requeue="interrupted", error="stopped")
                if outcome.requeue:
                    outcome.requeue = "interrupted"
                scheduler.report(outcome)
                entries.pop(remote_id)
                self.forget(remote_id)
            if entries:
                time.sleep(self.poll_seconds)
        for remote_id, entry in entries.items():
            scheduler.report(Outcome(entry.job, self.name, remote_id, requeue="interrupted", error="stopped"))
        with self.lock:
            self.inflight.clear()
