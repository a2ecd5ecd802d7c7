"""Why a request failed, by cause: the client's mistake (4xx) or a fault on our side (5xx).

Code that rejects a request raises one of these; the worker turns it into a `Failed` event and the gateway into
an HTTP status. Anything else that escapes is a server fault by definition, never blamed on the client.
"""

from __future__ import annotations


class RequestError(Exception):
    """Base: a request that cannot be answered. `status` is the HTTP status the client gets."""

    status = 500


class InvalidRequest(RequestError, ValueError):
    """The request itself is wrong (an empty prompt, a token id outside the vocabulary, too long a prompt)."""

    status = 400


class FunctionGone(RequestError):
    """The function was removed or redeployed with another model while the request waited or ran."""

    status = 410


class NotDeployed(RequestError):
    status = 404


class ModelUnavailable(RequestError):
    """The model can't be brought up here right now (no memory for it); another try may succeed."""

    status = 503


class ServerFault(RequestError):
    """Our side failed: bad model files, a broken tokenizer, an engine step that raised."""

    status = 500
