"""`fedlora flower worker`: ONE long-lived process that serves every ClientApp message of a SuperNode.

Flower 1.42 runs each message to a node in a new `flwr-clientapp` process, which imports torch, transformers
and peft and loads the model before any work (≈8.6 s with SmolLM2; docs/performance.md). A SuperNode started
with `flower-supernode --isolation process` starts no process of its own for its tasks: it waits for one
outside process to take them from its Runtime API (the ClientAppIo API of earlier versions). This worker is
that process. It imports the project once, then loops: acquire a task (the SuperNode hands out a token per
task), pull the task's message, context and FAB, call the run's ClientApp in THIS process, push the reply and
the context back, acquire the next. `workspace` keeps the model it built between messages (keyed by config),
so a node loads its model once, not once per message.

Per task it does what `flwr.supernode.runtime.run_clientapp` does in a fresh process, except: the FAB is
unpacked once per hash; heartbeats that the SuperNode refuses (a stopped run, an expired task) end that task,
not the process; network retries give up with one line instead of signalling the process; a task's objects
are polled for every 0.02-0.5 s (a fresh process was slow enough never to wait for them; this one would
wait Flower's 1 s backoff on every message). SIGTERM/SIGINT stop it; a task in progress is reported as failed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

Say = Callable[[str], None]
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the one call a SuperNode may protect with a SuperExec secret


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: ends the task in progress (not an Exception: the
    ClientApp's own error handling does not swallow it)."""


class _Stopper:
    """The SIGTERM/SIGINT handler: the first signal raises _Stop, at once or, while a task reports its outcome
    (`shielded`), right after; later signals are ignored (the clean-up runs to its end)."""

    def __init__(self):
        self.requested: str | None = None
        self.critical = False

    def __call__(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            if not self.critical:
                raise _Stop(self.requested)

    @contextmanager
    def shielded(self):
        self.critical = True
        try:
            yield
        finally:
            self.critical = False
        if self.requested is not None:
            raise _Stop(self.requested)


def serve(address: str, *, insecure: bool, root_certificates: str | None = None,
          auth_secret_file: str | None = None, poll: float = 0.2, connect_timeout: float = 60.0,
          parent_pid: int | None = None, say: Say = print) -> int:
    """Serve the SuperNode at `address` (its Runtime API, `flower-supernode --port`) until a signal; 0 then."""
    _check(address, insecure, root_certificates, poll, connect_timeout)
    secret = _read_secret(auth_secret_file)
    stopper = _Stopper()
    previous = {s: signal.signal(s, stopper) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(parent_pid)  # SIGINT to this process once the parent is gone
        acquire = _acquire_client(address, insecure, root_certificates, secret, connect_timeout)
        t = time.perf_counter()  # the SuperNode answers: import once what every training message needs
        import fedlora.build  # noqa: F401  (torch, transformers, peft)
        import fedlora.client_host  # noqa: F401
        import fedlora.flower.client_app  # noqa: F401
        import fedlora.personal  # noqa: F401

        say(f"worker {os.getpid()}: imports {time.perf_counter() - t:.1f}s; serving the ClientApp tasks of the "
            f"SuperNode at {address}")
        try:
            _loop(acquire, address, insecure, root_certificates, poll, stopper, say)
        finally:
            acquire.close()
    except _Stop as e:
        say(f"worker {os.getpid()}: {e} received; stopped")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _loop(acquire, address: str, insecure: bool, root_certificates: str | None, poll: float, stopper: _Stopper,
          say: Say) -> None:
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        try:
            res = acquire.AcquireTask(request)
        except httpx.HTTPError as e:
            raise UserError(f"lost the SuperNode's Runtime API at {address}: {_one_line(e)}") from None
        if res.HasField("task") and res.token:
            run_task(address, res.token, insecure, root_certificates, stopper, say)
        else:
            time.sleep(poll)


def _acquire_client(address: str, insecure: bool, root_certificates: str | None, secret: bytes | None,
                    connect_timeout: float):
    """The client that acquires tasks, checked with one call: the address must answer within the timeout."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[_ACQUIRE]))
    retry = _retry(connect_timeout)
    client = RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                   root_certificates=root_certificates,
                                                   interceptors=interceptors, retry_invoker=retry)
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[]))  # asks for nothing: a probe
    except httpx.HTTPError as e:
        client.close()
        hint = ("is a `flower-supernode --isolation process` listening there (its --port)?"
                if isinstance(e, httpx.TransportError) else "is it a SuperNode's Runtime API, with the same TLS "
                "settings and SuperExec secret?")
        raise UserError(f"cannot reach the SuperNode's Runtime API at {address} within {connect_timeout:g}s "
                        f"({_one_line(e)}); {hint}") from None
    return client


def run_task(address: str, token: str, insecure: bool, root_certificates: str | None, stopper: _Stopper,
             say: Say) -> bool:
    """One ClientApp task, start to end, in this process; the reply (or Flower's error reply) goes back."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = _retry(120.0)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
    heartbeat = message = reply = context = None
    status, details, what = SubStatus.FAILED, "ClientApp task failed due to unknown reason", "task"
    t = time.perf_counter()
    try:
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        message, context, run, fab = _pull_task_input(client)
        what = f"node {context.node_id} {message.metadata.message_type} (run {run.run_id})"
        if fab.hash_str not in _INSTALLED:  # every task of a run has the same FAB: unpack it once
            install_from_fab(fab.content, skip_prompt=True)
            _INSTALLED.add(fab.hash_str)
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)  # imported once: later tasks find it in sys.modules
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except _Stop:
        details = "the worker was stopped"
        raise
    except Exception as e:  # noqa: BLE001  (as flwr-clientapp: the error goes back to the server)
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(e, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(e)}:<'{e}'>"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        with stopper.shielded():  # a signal now stops the worker after this, not in the middle of it
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as e:  # noqa: BLE001
                status, details = SubStatus.FAILED, f"could not push the reply: {_one_line(e)}"
            if heartbeat is not None and heartbeat.is_running:
                heartbeat.stop()
            retry.max_tries = 1  # the outcome: one try, so that a gone SuperNode cannot hold up a stop
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
            outcome = "done" if status == SubStatus.COMPLETED else f"FAILED: {_one_line(details)[:300]}"
            say(f"worker {os.getpid()}: {what}: {outcome} in {time.perf_counter() - t:.2f}s")
    return status == SubStatus.COMPLETED


_INSTALLED: set[str] = set()


def _pull_task_input(client):
    """flwr.supernode.runtime.run_clientapp.pull_task_input, polling for the message's objects every 0.02 s
    (up to 0.5 s) instead of Flower's 1 s, 2 s, 4 s: the SuperNode hands out a task as soon as the message's
    header is in, while it still fetches the arrays from the SuperLink."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, \
        res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.5, max_tries_per_object=20000)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks its id
    return message, context, run, fab


def _heartbeat_fn(client):
    """flwr's task heartbeat, except for a task the SuperNode no longer runs: Flower's sends SIGINT to its
    process (one process per task), which here would stop the worker; this one just stops beating."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as e:
            if e.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise SystemExit from None  # ends the heartbeat thread only
        if not res.success:
            raise SystemExit  # ends the heartbeat thread only; the task's reply is then refused
        return True

    return beat


def _retry(max_time: float | None):
    """Retries of network errors and 502-504 for up to `max_time` s; any other HTTP status gives up at once.
    (Flower's invoker retries forever and, on a 401, signals its own process: right for a process per task.)"""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(e: Exception) -> bool:
        if isinstance(e, httpx.HTTPStatusError):
            return e.response.status_code not in (502, 503, 504)
        return any(w in str(e).lower() for w in ("certificate", "ssl", "tls"))

    return RetryInvoker(lambda: exponential(base_delay=0.2, max_delay=5), (httpx.TransportError,
                        httpx.HTTPStatusError), max_tries=None, max_time=max_time, should_giveup=give_up)


def _check(address: str, insecure: bool, root_certificates: str | None, poll: float, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--runtime-api-address: {address!r} is not HOST:PORT (the SuperNode's --host and --port, "
                        f"e.g. 127.0.0.1:9094)")
    if insecure == (root_certificates is not None):
        raise UserError("give exactly one of --insecure (the SuperNode's Runtime API without TLS, its default) "
                        "and --root-certificates CA.pem (with TLS: flower-supernode --ssl-certfile ...)")
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise UserError(f"--root-certificates: {root_certificates} is not a file")
    if not 0.01 <= poll <= 60 or timeout <= 0:
        raise UserError("--poll must be between 0.01 and 60 seconds and --connect-timeout > 0")


def _read_secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--superexec-auth-secret-file: {_one_line(e)}") from None
    if not secret:
        raise UserError(f"--superexec-auth-secret-file: {path} is empty")
    return secret


def _one_line(x) -> str:
    return " ".join(str(x).split()) or type(x).__name__
