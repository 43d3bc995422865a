"""Send an alert to a chat webhook: a JSON POST that Slack incoming webhooks (and most others) accept.

The URL is a secret (a Slack webhook URL carries its token): it never appears in a message or a log.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from pg2kinesis_dagster.core.errors import Pg2KinesisError

DEFAULT_TIMEOUT_SECONDS = 10.0


class WebhookError(Pg2KinesisError):
    """The webhook did not accept the message (the reason never includes the URL)."""


def slack_payload(text: str) -> dict[str, object]:
    # "text" is what a Slack incoming webhook requires; mrkdwn is its default rendering.
    return {"text": text}


def post_message(url: str, text: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """POST ``{"text": text}`` to ``url``; raise WebhookError unless the answer is 2xx."""
    if not url.startswith(("https://", "http://")):
        raise WebhookError("the alert webhook URL must start with https:// (or http:// for a local receiver)")
    body = json.dumps(slack_payload(text)).encode("utf-8")
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "pg2kinesis-alerts"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"the alert webhook answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WebhookError(f"cannot reach the alert webhook: {type(reason).__name__}: {reason}") from None
