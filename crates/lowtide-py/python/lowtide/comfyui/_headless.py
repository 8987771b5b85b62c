"""A real ComfyUI, headless and in-process, on the CPU: for tests and demos.

ComfyUI is a source tree, not a package: :func:`import_comfyui` puts its root first on
``sys.path`` and imports it the way its ``main.py`` does, with the CPU forced;
:func:`prepare` also points the folders ComfyUI writes (output, temp, user, input) and the
model folders it reads (checkpoints, loras) at a writable directory, because the tree itself
may be read-only. :func:`run_workflow` runs an API-format prompt through ComfyUI's own
``execution.PromptExecutor`` (validated first, as its server does) and returns the saved images;
:func:`load_custom_nodes` imports custom node packages as ComfyUI's startup does.

ComfyUI's state is global (``comfy.model_management``'s loaded models, ``folder_paths``,
``nodes.NODE_CLASS_MAPPINGS``): a process imports one ComfyUI tree, once, and every caller
shares it. ComfyUI's modules are imported here only when a function is called.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import io
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ENV_VAR = "LOWTIDE_COMFYUI"
DEVICE_VAR = "LOWTIDE_COMFYUI_DEVICE"
"""``cpu`` (the default) runs ComfyUI on the CPU; ``gpu`` lets it pick its device."""
"""Names the ComfyUI source tree to use; without it, ``../shared/comfyui`` next to the
repository is used where it exists."""

# The repository root: this file is crates/lowtide-py/python/lowtide/comfyui/_headless.py.
_REPO_ROOT = Path(__file__).resolve().parents[5]


class ComfyUIError(RuntimeError):
    """Something about ComfyUI failed; the message says what, in ComfyUI's words."""


class ComfyUINotFound(ComfyUIError):
    """No ComfyUI source tree: none given, ``$LOWTIDE_COMFYUI`` unset and no
    ``../shared/comfyui`` next to the repository."""


class WorkflowInvalid(ComfyUIError):
    """ComfyUI refused the prompt before running it (its ``validate_prompt``).

    ``error`` is ComfyUI's error dict (``type``, ``message``, ``details``); ``node_errors``
    maps node ids to their reasons."""

    def __init__(self, error: Mapping[str, Any], node_errors: Mapping[str, Any]) -> None:
        self.error = dict(error)
        self.node_errors = dict(node_errors)
        lines = [f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}"]
        for node_id, info in self.node_errors.items():
            for reason in info.get("errors", []):
                lines.append(
                    f"  node {node_id} ({info.get('class_type')}): "
                    f"{reason.get('message')}: {reason.get('details')}"
                )
        super().__init__("\n".join(lines))


class WorkflowFailed(ComfyUIError):
    """A node raised while ComfyUI ran the prompt; the fields are those of ComfyUI's
    ``execution_error`` message (``traceback`` is a list of formatted frames)."""

    def __init__(self, message: Mapping[str, Any]) -> None:
        self.node_id: str = message.get("node_id", "?")
        self.node_type: str = message.get("node_type", "?")
        self.exception_type: str = message.get("exception_type", "?")
        self.exception_message: str = message.get("exception_message", "")
        self.traceback: list[str] = list(message.get("traceback", []))
        super().__init__(
            f"node {self.node_id} ({self.node_type}) raised {self.exception_type}: "
            f"{self.exception_message}\n{''.join(self.traceback)}"
        )


@dataclass(frozen=True)
class Headless:
    """A prepared ComfyUI: its source tree and the writable folders it was pointed at."""

    root: Path
    """The ComfyUI source tree (read-only is fine)."""
    workdir: Path
    output_dir: Path
    temp_dir: Path
    user_dir: Path
    input_dir: Path
    checkpoints_dir: Path
    """First in ComfyUI's ``checkpoints`` folder list: ``ckpt_name`` values are relative to it."""
    loras_dir: Path
    """First in ComfyUI's ``loras`` folder list."""


@dataclass(frozen=True)
class SavedImage:
    """One image a ``SaveImage`` node wrote: the PNG file's bytes as ComfyUI wrote them."""

    node_id: str
    path: Path
    png: bytes

    def pixels(self) -> np.ndarray:
        """The decoded pixels: ``uint8``, shape (height, width, channels); a new array."""
        from PIL import Image

        with Image.open(io.BytesIO(self.png)) as image:
            return np.asarray(image.convert("RGB")).copy()


@dataclass(frozen=True)
class WorkflowResult:
    """What one run produced: the saved images in node-id order, then batch order."""

    prompt_id: str
    images: list[SavedImage]
    messages: list[tuple[str, dict[str, Any]]] = field(repr=False)
    """ComfyUI's status messages for the run, in order: (event, data), as its history
    keeps them (``execution_start``, ``execution_cached``, then ``execution_success`` or
    ``execution_error``)."""


class _StubServer:
    """What ``PromptExecutor`` and the progress handlers use of ComfyUI's ``PromptServer``;
    with no client, messages go nowhere (the executor keeps its status messages itself)."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


@dataclass
class _Process:
    """This process's ComfyUI: the tree imported, and the folders last prepared."""

    root: Path
    headless: Headless | None = None


_process: _Process | None = None


def find_comfyui(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The ComfyUI source tree to use: ``path`` if given, else ``$LOWTIDE_COMFYUI``, else
    ``../shared/comfyui`` next to the repository; None when the chosen one is not a ComfyUI
    tree (no ``nodes.py`` and ``comfy/``) or none is named and the default is absent."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        path = _REPO_ROOT.parent / "shared" / "comfyui"
    root = Path(path).resolve()
    if (root / "nodes.py").is_file() and (root / "comfy").is_dir():
        return root
    return None


def import_comfyui(path: str | os.PathLike[str] | None = None) -> Path:
    """Imports ComfyUI from ``path`` (see :func:`find_comfyui`) for the CPU, once per process;
    returns its root. Later calls return the same root; naming another tree then raises
    :class:`ComfyUIError` (ComfyUI's modules cannot be imported twice in one process).

    This is the order ComfyUI's ``main.py`` keeps, less the server: argument parsing off and
    ``args.cpu`` set before ``comfy.model_management`` is imported (it picks the device at
    import), ``utils.*`` before ``nodes`` (``nodes`` puts ``comfy/`` first on ``sys.path``,
    where ``comfy/utils.py`` then shadows the ``utils`` package), and PNG metadata off, so a
    saved image's bytes depend on its pixels only, not on the prompt's text."""
    global _process
    root = find_comfyui(path)
    if _process is not None:
        if root is not None and root != _process.root:
            raise ComfyUIError(
                f"this process already imported ComfyUI from {_process.root}; "
                f"it cannot import another from {root}"
            )
        return _process.root
    if root is None:
        where = path if path is not None else os.environ.get(ENV_VAR) or "../shared/comfyui"
        raise ComfyUINotFound(
            f"no ComfyUI source tree at {where} (set ${ENV_VAR} to one, e.g. a v0.3.64 checkout)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        # The CPU unless told otherwise (scripts/gpu-check.sh runs the tests on a GPU).
        args.cpu = os.environ.get(DEVICE_VAR, "cpu") == "cpu"
        args.disable_metadata = True
        # main.py's order: `utils.*` before `nodes` (see above); `comfy.model_management`
        # picks the device when imported.
        for name in (
            "utils.extra_config",
            "utils.install_util",
            "utils.json_util",
            "comfy.model_management",
            "folder_paths",
            "nodes",
            "execution",
            "hook_breaker_ac10a0",
        ):
            importlib.import_module(name)
    except ImportError as error:
        raise ComfyUIError(
            f"ComfyUI at {root} failed to import: {error} (scripts/test installs the "
            "packages it needs for SD1.x workflows)"
        ) from error

    _process = _Process(root)
    return root


def prepare(
    workdir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None
) -> Headless:
    """Imports ComfyUI (:func:`import_comfyui`) and points its folders into ``workdir``:
    ``output``, ``temp``, ``user``, ``input``, and ``models/checkpoints`` and ``models/loras``
    first in its model folder lists (created; the tree's own stay behind them). Only ComfyUI's
    core nodes (``nodes.py``) are registered: see :func:`load_extra_nodes` and
    :func:`load_custom_nodes` for the rest.

    May be called again, with another ``workdir``: the folders then move there (the model
    folders of earlier calls stay in the lists, behind the new ones). Raises
    :class:`ComfyUINotFound` without a tree."""
    root = import_comfyui(path)
    assert _process is not None
    import folder_paths

    work = Path(workdir).resolve()
    dirs = {
        name: work / name
        for name in ("output", "temp", "user", "input", "models/checkpoints", "models/loras")
    }
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.add_model_folder_path("checkpoints", str(dirs["models/checkpoints"]), True)
    folder_paths.add_model_folder_path("loras", str(dirs["models/loras"]), True)
    folder_paths.filename_list_cache.clear()

    headless = Headless(
        root=root,
        workdir=work,
        output_dir=dirs["output"],
        temp_dir=dirs["temp"],
        user_dir=dirs["user"],
        input_dir=dirs["input"],
        checkpoints_dir=dirs["models/checkpoints"],
        loras_dir=dirs["models/loras"],
    )
    _process.headless = headless
    return headless


def prepared() -> Headless:
    """The :class:`Headless` that :func:`prepare` last returned in this process; raises
    :class:`ComfyUIError` before that."""
    if _process is None or _process.headless is None:
        raise ComfyUIError("ComfyUI is not prepared in this process: call prepare() first")
    return _process.headless


@contextmanager
def _hooks_restored() -> Iterator[None]:
    """ComfyUI's guard around custom node imports: functions a node pack may replace
    (``model_management.cast_to``) are put back afterwards (``hook_breaker_ac10a0``)."""
    import hook_breaker_ac10a0

    hook_breaker_ac10a0.save_functions()
    try:
        yield
    finally:
        hook_breaker_ac10a0.restore_functions()


def load_extra_nodes() -> list[str]:
    """Imports ComfyUI's built-in ``comfy_extras`` nodes as its startup does
    (``nodes.init_extra_nodes`` without API nodes or custom nodes, between
    ``hook_breaker_ac10a0``'s save and restore); needs :func:`prepare` first. Returns the
    files ComfyUI reports as failed (it logs why): some need packages a text-to-image
    workflow does not (kornia, spandrel, torchaudio, aiohttp for the server). Once per
    process is enough; again, it imports them again."""
    prepared()
    import nodes

    with _hooks_restored():
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return list(failed)


@dataclass(frozen=True)
class NodeImport:
    """How one custom node module or package fared: ComfyUI's verdict and what it logged
    (warnings and errors, with the traceback of a failed import)."""

    path: Path
    ok: bool
    log: str


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def load_custom_nodes(directory: str | os.PathLike[str]) -> list[NodeImport]:
    """Imports each custom node module or package in ``directory`` as ComfyUI's startup does
    (``nodes.load_custom_node``: ``.py`` files and folders, not ``*.disabled`` nor
    ``__pycache__``; node classes already registered are not replaced), between
    ``hook_breaker_ac10a0``'s save and restore; needs :func:`prepare` first. Returns one
    :class:`NodeImport` per module, in name order; ComfyUI logs failures rather than raising,
    and so does this."""
    prepared()
    import nodes

    base_names = set(nodes.NODE_CLASS_MAPPINGS)
    results = []
    for entry in sorted(Path(directory).iterdir()):
        if entry.name == "__pycache__" or entry.name.endswith(".disabled"):
            continue
        if entry.is_file() and entry.suffix != ".py":
            continue
        collect = _Collect()
        logging.getLogger().addHandler(collect)
        try:
            with _hooks_restored():
                ok = asyncio.run(nodes.load_custom_node(str(entry), base_names, "custom_nodes"))
        finally:
            logging.getLogger().removeHandler(collect)
        results.append(NodeImport(entry, bool(ok), "\n".join(collect.lines)))
    return results


class Runner:
    """One ``execution.PromptExecutor`` kept across runs, as ComfyUI's server keeps one: a
    node whose inputs did not change since the last run is not run again (its outputs are
    cached, models included). Needs :func:`prepare` first."""

    def __init__(self) -> None:
        prepared()
        import execution

        self._server = _StubServer()
        self._executor = execution.PromptExecutor(
            self._server, cache_type=execution.CacheType.CLASSIC
        )

    def run(self, prompt: Mapping[str, Any], *, prompt_id: str | None = None) -> WorkflowResult:
        """Runs the API-format ``prompt`` (node id -> ``{"class_type", "inputs"}``) as ComfyUI's
        server does: ``execution.validate_prompt``, then the executor on the outputs that
        passed; returns the images its ``SaveImage`` nodes wrote, read back from the output
        folder.

        Raises :class:`WorkflowInvalid` when ComfyUI refuses the prompt and
        :class:`WorkflowFailed` when a node raises, with ComfyUI's message and traceback."""
        import execution
        import folder_paths

        prompt = {str(k): v for k, v in prompt.items()}
        prompt_id = prompt_id or str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(
            execution.validate_prompt(prompt_id, prompt, None)
        )
        if not valid:
            raise WorkflowInvalid(error, node_errors)

        self._server.last_prompt_id = prompt_id
        self._executor.execute(prompt, prompt_id, {}, outputs)
        messages: list[tuple[str, dict[str, Any]]] = list(self._executor.status_messages)
        if not self._executor.success:
            for event, data in messages:
                if event in ("execution_error", "execution_interrupted"):
                    raise WorkflowFailed(data)
            raise ComfyUIError(f"ComfyUI's run of prompt {prompt_id} failed: {messages}")

        images = []
        ui = self._executor.history_result["outputs"]
        for node_id in sorted(ui, key=_node_order):
            for entry in ui[node_id].get("images", []):
                base = folder_paths.get_directory_by_type(entry.get("type", "output"))
                if base is None:
                    raise ComfyUIError(f"node {node_id} saved an image of unknown type: {entry}")
                file = Path(base) / entry.get("subfolder", "") / entry["filename"]
                images.append(SavedImage(node_id, file, file.read_bytes()))
        return WorkflowResult(prompt_id, images, messages)

    def reset(self) -> None:
        """Forgets every cached output (the executor's ``reset``), as the server's "free
        memory" request does; models stay loaded until :func:`free_models`."""
        self._executor.reset()


def run_workflow(
    prompt: Mapping[str, Any], *, prompt_id: str | None = None, free: bool = True
) -> WorkflowResult:
    """Runs ``prompt`` once, from scratch: a new :class:`Runner` (every node runs; nothing is
    cached from earlier runs), then, with ``free``, :func:`free_models`, so the next run
    starts with nothing loaded either. Default: ``free=True``. Raises as :meth:`Runner.run`."""
    try:
        return Runner().run(prompt, prompt_id=prompt_id)
    finally:
        if free:
            free_models()


def free_models() -> None:
    """Unloads every model ComfyUI holds (``model_management.unload_all_models``: each
    patcher's ``detach``, its LoRA backups put back) and collects garbage, as ComfyUI's
    server does when asked to free memory."""
    prepared()
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)
