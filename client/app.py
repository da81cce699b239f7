"""The ClientApp, one for every method.

Train: load the global shared tensors, restore this client's private tensors, train E local
epochs with this client's own optimiser on the method's loss, store the private tensors, and
reply with the shared tensors only. Evaluate: accuracy with the tensors the server sent and
this client's private ones. The work itself is ``client.work``.

In a deployment Flower starts a new ``flwr-clientapp`` process for every message, so this module
imports only Flower: the message goes to the node's warm worker (``client.warm``), a long-lived
process on the same node that keeps torch, the model and the decoded test images loaded and runs
the same ``client.work`` code. When there is no worker to be had, or in simulation (whose Ray actors
are long-lived already), the work runs here, as it always did.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import warm

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    if warm.enabled(context):
        reply = warm.handle(msg, context)
        if reply is not None:
            return reply
    from client import work  # torch, open_clip, the model: seconds of imports

    return work.handle(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


def __getattr__(name: str) -> Any:
    """``client.app.ClientJob`` and the other names of ``client.work``, loaded on first use."""
    from client import work

    try:
        return getattr(work, name)
    except AttributeError:
        raise AttributeError(f"module 'client.app' has no attribute {name!r}") from None
