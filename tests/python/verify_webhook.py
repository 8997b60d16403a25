"""Verifies one webhook delivery with the official `standardwebhooks` package.

stdin: {"secret": "whsec_...", "headers": {...}, "body": "<raw body>"}.
Exits 0 and prints the verified payload's type when the signature is valid.
"""
import json
import sys

try:
    from standardwebhooks.webhooks import Webhook
except ImportError as e:  # pragma: no cover - the test must fail, not skip
    print(f"standardwebhooks is not installed: {e}; run `pip install standardwebhooks`", file=sys.stderr)
    sys.exit(3)

msg = json.load(sys.stdin)
payload = Webhook(msg["secret"]).verify(msg["body"], msg["headers"])
print(payload["type"])
# A tampered body must be refused by the same verifier.
try:
    Webhook(msg["secret"]).verify(msg["body"] + " ", msg["headers"])
except Exception:
    print("tampered body refused")
else:
    print("tampered body ACCEPTED", file=sys.stderr)
    sys.exit(1)
