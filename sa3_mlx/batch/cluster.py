"""``sa3 batch --ray``: the workers are Ray actors, one per GPU (or per ``cpus_per_worker`` cores of a node
without GPUs), each holding its loaded models across units (:class:`~.render.Renderer`).

Ray is an optional dependency (``pip install 'sa3-mlx[ray]'``); nothing here imports it before a cluster is
asked for. The driver (:mod:`.schedule`) decides what runs where; this module starts the actors, places them
(node affinity), hands them units, and turns a dead actor (killed, out of memory, node lost) into a lost
unit and, within a budget, a replacement worker. Every node needs the package installed, the model files
(its Hugging Face cache or ``weights_dir``) and the output folder at the same path (a shared filesystem).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from .items import Item
from .render import Renderer, problems
from .schedule import BatchStopped, Outcome, Unit, WorkerInfo, describe_error

RAY_REQUIREMENT = "ray>=2.40,<3"
INSTALL_HINT = ("Ray is not installed here: pip install 'sa3-mlx[ray]' (or ./install.sh --ray; "
                f"{RAY_REQUIREMENT}), or leave out --ray to run on this machine alone")
CHECK_SECONDS = 120.0  # a node that has not answered the file check by then is reported
START_SECONDS = 300.0  # a worker that has not started by then (no room on its node) is given up


def import_ray():
    try:
        import ray
    except ImportError:
        raise BatchStopped(INSTALL_HINT) from None
    major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    if (major, minor) < (2, 40) or major >= 3:
        raise BatchStopped(f"Ray {ray.__version__} is installed; sa3 batch needs {RAY_REQUIREMENT}")
    return ray


class RenderWorker:
    """What one actor holds: its models (one pipeline at a time) and the output folder. Made a Ray actor by
    :class:`RayExecutor`; a plain object otherwise (its methods return, never raise, an item's failure)."""

    def __init__(self, name: str, folder: str, weights_dir: str | None, cores: Sequence[int] | None = None):
        from ..pipeline import Pipeline
        from ..runtime import configure_process

        configure_process()
        if cores and hasattr(os, "sched_setaffinity"):  # CPU workers sharing a node: each on its own cores
            try:
                os.sched_setaffinity(0, set(cores))
            except OSError:
                pass
        self.name, self.folder, self.weights_dir = name, folder, weights_dir
        self.renderer = Renderer(lambda s: Pipeline.from_settings(s, weights_dir=weights_dir, progress=False))

    def info(self) -> WorkerInfo:
        from ..backend import device_name

        return WorkerInfo(self.name, node_label(), os.getpid(), device_name())

    def render(self, items: list[Item]) -> dict:
        try:
            return {"rendered": self.renderer.render(items, self.folder, overwrite=True)}
        except BaseException as e:  # the driver decides: retry elsewhere, or record it failed
            return {"error": describe_error(e)}


def node_label(ip: str | None = None, node_id: str | None = None) -> str:
    """How messages name a node: its address (and its id's start, as several may share a machine)."""
    if ip is None:
        try:
            import ray

            ctx = ray.get_runtime_context()
            node_id = ctx.get_node_id()
            ip = ray.util.get_node_ip_address()
        except Exception:
            return socket.gethostname()
    return f"node {ip}" + (f" ({node_id[:8]})" if node_id else "")


def check_node(items: list[Item], folder: str, weights_dir: str | None) -> list[str]:
    return problems(items, folder, weights_dir)


def _needs(items: Sequence[Item]) -> list[Item]:
    """One item per distinct need (model, decoder, LoRAs, audio input): all a node's check has to see."""
    seen, out = set(), []
    for item in items:
        s = item.settings
        key = (s.model_name, s.decoder, tuple(s.loras), s.init_audio)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def local_cluster_cpus(workers: int | None, cpus_per_worker: int | None, cores: int) -> int:
    """The size of the ``--ray local`` cluster on a machine of ``cores`` cores: ``workers x cpus_per_worker``
    when both are given, else the machine's cores, at least one per worker (the workers share them:
    :meth:`RayExecutor._placements` splits them). Sizing it as ``workers`` cores left one worker one core
    of two: +60% per clip, measured."""
    if workers and cpus_per_worker:
        return workers * cpus_per_worker
    return max(cores, workers or 0)


class RayExecutor:
    """Workers on a Ray cluster: ``address`` ``"auto"`` (the cluster this machine belongs to), ``"local"``
    (a throwaway cluster on this machine, sized by :func:`local_cluster_cpus`) or a cluster address."""

    def __init__(self, address: str, folder: Path, weights_dir: Path | None = None, workers: int | None = None,
                 cpus_per_worker: int | None = None, replacements: int | None = None):
        self.ray = import_ray()
        self.address, self.folder, self.weights_dir = address, Path(folder).resolve(), weights_dir
        self.max_workers, self.cpus_per_worker = workers, cpus_per_worker
        self.replacements = replacements
        self.actors: dict[str, object] = {}  # ready workers
        self.slots: dict[str, dict] = {}  # worker -> its placement (node, resources, cores)
        self.starting: dict = {}  # info ref -> worker (not ready yet)
        self.started_at: dict[str, float] = {}
        self.running_refs: dict = {}  # render ref -> (worker, unit)
        self.joined: list[WorkerInfo] = []
        self.count = 0
        self._connect()
        self.actor_class = self.ray.remote(RenderWorker)

    # ---- the cluster ----------------------------------------------------------------------------
    def _connect(self) -> None:
        import logging

        ray = self.ray
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                       configure_logging=True)
        if self.address != "local":
            self._probe()
        try:
            if self.address == "local":
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                cores = local_cluster_cpus(self.max_workers, self.cpus_per_worker, cores)
                ray.init(num_cpus=cores, object_store_memory=128 * 1024**2, **options)
            else:
                ray.init(address=self.address, **options)
        except ConnectionError as e:
            raise BatchStopped(f"--ray {self.address}: no Ray cluster could be reached ({e}); start one with "
                               "`ray start --head`, or use --ray local") from None
        except (RuntimeError, ValueError) as e:
            raise BatchStopped(f"--ray {self.address}: {' '.join(str(e).split())}") from None

    def _probe(self) -> None:
        """Fail at once, in one line, when the cluster's address does not answer (Ray itself retries for
        minutes, logging each try)."""
        address = self.address
        if address.startswith("ray://"):
            return  # a Ray client server: Ray's own error is quick
        if address == "auto":
            try:
                from ray._private.services import canonicalize_bootstrap_address

                address = canonicalize_bootstrap_address("auto") or ""
            except Exception:  # no cluster known here (or another Ray): ray.init says so
                return
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise BatchStopped(f"--ray {self.address}: give auto, local or HOST:PORT of the cluster's head")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except OSError as e:
            raise BatchStopped(f"--ray {self.address}: no Ray cluster answers at {address} ({e.strerror or e}); "
                               "start one with `ray start --head`, or use --ray local") from None

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def _placements(self) -> list[dict]:
        """Where workers go: one per GPU of a node; on a node without GPUs one per ``cpus_per_worker``
        cores (default: the whole node), each pinned to its own cores."""
        slots = []
        for node in self.nodes():
            res = node.get("Resources", {})
            gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
            label = node_label(node.get("NodeManagerAddress"), node.get("NodeID"))
            if gpus:
                slots += [dict(node=node["NodeID"], label=label, num_gpus=1, num_cpus=min(1, cpus), cores=None)
                          for _ in range(gpus)]
                continue
            per = self.cpus_per_worker or (max(1, cpus // self.max_workers) if self.address == "local"
                                           and self.max_workers else cpus)
            if per <= 0 or cpus < per:
                continue
            count = cpus // per
            slots += [dict(node=node["NodeID"], label=label, num_gpus=0, num_cpus=per,
                           cores=list(range(i * per, (i + 1) * per)) if count > 1 else None)
                      for i in range(count)]
        if self.max_workers:
            slots = slots[: self.max_workers]
        return slots

    def check(self, items: Sequence[Item], folder: Path) -> dict[str, list[str]]:
        """Every node's problems (:func:`~.render.problems`), asked of the node itself."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        task = ray.remote(check_node)
        needs = _needs(items)
        asked = {}
        for node in self.nodes():
            ref = task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                               ).remote(needs, str(self.folder), None if self.weights_dir is None else str(self.weights_dir))
            asked[ref] = node_label(node.get("NodeManagerAddress"), node.get("NodeID"))
        ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=CHECK_SECONDS)
        found = {asked[ref]: ["did not answer the file check in time"] for ref in late}
        for ref in ready:
            try:
                found[asked[ref]] = ray.get(ref)
            except self.ray.exceptions.RayError as e:
                found[asked[ref]] = [f"the file check failed ({' '.join(str(e).split())[:200]})"]
        return found

    # ---- workers ------------------------------------------------------------------------------
    def _spawn(self, slot: dict) -> None:
        import time

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.count += 1
        name = f"w{self.count}"
        threads = str(slot["num_cpus"] or 1)
        actor = self.actor_class.options(
            num_cpus=slot["num_cpus"], num_gpus=slot["num_gpus"], max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot["node"], soft=False),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}},
        ).remote(name, str(self.folder), None if self.weights_dir is None else str(self.weights_dir), slot["cores"])
        self.slots[name] = dict(slot, actor=actor)
        self.starting[actor.info.remote()] = name
        self.started_at[name] = time.monotonic()

    def start(self) -> list[WorkerInfo]:
        slots = self._placements()
        if not slots:
            raise BatchStopped("the Ray cluster has no node with a GPU or enough CPUs for a worker "
                               f"(--cpus-per-worker {self.cpus_per_worker})" if self.cpus_per_worker else
                               "the Ray cluster has no node to run a worker on")
        if self.replacements is None:
            self.replacements = 2 * len(slots)
        for slot in slots:
            self._spawn(slot)
        ready, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=START_SECONDS)
        infos = []
        for ref in ready:
            info = self._joined(ref)
            if info is not None:
                infos.append(info)
        if not infos:
            raise BatchStopped("no worker could be started on the Ray cluster")
        self.joined.clear()
        return infos

    def _joined(self, ref) -> WorkerInfo | None:
        name = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            self.slots.pop(name, None)
            return None
        self.actors[name] = self.slots[name]["actor"]
        self.joined.append(info)
        return info

    def new_workers(self) -> list[WorkerInfo]:
        joined, self.joined = self.joined, []
        return joined

    def idle(self) -> list[str]:
        busy = {worker for worker, _ in self.running_refs.values()}
        return [name for name in self.actors if name not in busy]

    def submit(self, worker: str, unit: Unit) -> None:
        ref = self.actors[worker].render.remote(unit.items)
        self.running_refs[ref] = (worker, unit)

    def wait(self, timeout: float) -> list[Outcome]:
        import time

        ray = self.ray
        refs = list(self.running_refs) + list(self.starting)
        if not refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        outcomes = []
        for ref in ready:
            if ref in self.starting:
                self._joined(ref)
                continue
            worker, unit = self.running_refs.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died with the unit
                outcomes.append(Outcome(worker, unit, error=_lost_reason(e), lost=True))
                self._replace(worker)
                continue
            if "error" in answer:
                outcomes.append(Outcome(worker, unit, error=answer["error"]))
            else:
                outcomes.append(Outcome(worker, unit, rendered=answer["rendered"]))
        now = time.monotonic()
        for ref, name in list(self.starting.items()):  # a replacement that finds no room is given up
            if now - self.started_at[name] > START_SECONDS:
                self.starting.pop(ref)
                self.ray.kill(self.slots.pop(name)["actor"])
        return outcomes

    def _replace(self, worker: str) -> None:
        self.actors.pop(worker, None)
        slot = self.slots.pop(worker, None)
        if slot is None or not self.replacements:
            return
        alive = {n["NodeID"] for n in self.nodes()}
        if slot["node"] in alive:
            self.replacements -= 1
            self._spawn({k: v for k, v in slot.items() if k != "actor"})

    def running(self) -> int:
        return len(self.running_refs)

    def alive(self) -> bool:
        return bool(self.actors or self.starting)

    def cancel(self) -> None:
        for worker, _ in list(self.running_refs.values()):
            actor = self.actors.get(worker)
            if actor is not None:
                self.ray.kill(actor)  # its half-written files are removed when the run is resumed
        self.running_refs.clear()

    def shutdown(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.actors.clear()
        self.ray.shutdown()


def _lost_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return "the worker was lost (" + (text[:160] + "..." if len(text) > 160 else text) + ")"


__all__ = ["INSTALL_HINT", "RAY_REQUIREMENT", "RayExecutor", "RenderWorker", "import_ray"]
