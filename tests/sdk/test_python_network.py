"""The PyPI Python SDK's network features against the namespace test hosts.

Run by crates/matchlock/tests/network.rs (python_sdk_network_interception_and_secrets),
which checks on the server side what reached it. Environment: MATCHLOCK_BIN, NET_DNS,
NET_MARKER, NET_SECRET, MATCHLOCK_TEST_BUSYBOX, PYTHONPATH (the SDK).
"""

import json
import os
import unittest

from matchlock import (
    Client,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
)

DNS = os.environ["NET_DNS"]
MARKER = os.environ["NET_MARKER"]
SECRET = os.environ["NET_SECRET"]
BUSYBOX = os.environ["MATCHLOCK_TEST_BUSYBOX"]


class Network(unittest.TestCase):
    def test_allow_list_secrets_rules_and_callbacks(self):
        callbacks = []

        def before(req):
            callbacks.append((req.phase, req.host, req.path))
            headers = dict(req.request_headers or {})
            headers["X-From-Callback"] = ["python"]
            return NetworkHookResult(request=NetworkHookRequestMutation(headers=headers))

        def after(req):
            callbacks.append((req.phase, req.host, req.status_code))
            return NetworkHookResult(response=NetworkHookResponseMutation(set_body='{"msg":"from-callback"}'))

        rules = NetworkInterceptionConfig(
            rules=[
                NetworkHookRule(name="mutate", phase="before", hosts=["api.test"], path="/echo/*",
                                set_headers={"X-Hook": "set"}, delete_headers=["X-Remove"],
                                set_query={"trace": "hooked"}, delete_query=["drop"]),
                NetworkHookRule(name="cb-before", phase="before", hosts=["other.test"], hook=before),
                NetworkHookRule(name="cb-after", phase="after", hosts=["other.test"], path="/echo/*-after",
                                hook=after),
            ]
        )
        sandbox = (
            Sandbox(BUSYBOX)
            .allow_host("api.test", "other.test")
            .add_secret("MY_KEY", SECRET, "api.test")
            .with_dns_servers(DNS)
            .with_network_interception(rules)
        )
        with Client() as client:
            client.launch(sandbox)
            self.assertTrue(client.exec("echo $MY_KEY").stdout.startswith("SANDBOX_SECRET_"))
            r = client.exec(
                f'wget -qO- "http://api.test/echo/{MARKER}?drop=1&keep=2" '
                '--header "Authorization: Bearer $MY_KEY" --header "X-Remove: r"'
            )
            self.assertEqual(r.exit_code, 0, r.stderr)
            echoed = json.loads(r.stdout)
            self.assertNotIn(SECRET, r.stdout, "the response is scrubbed of the secret")
            self.assertEqual(echoed["headers"]["x-hook"], "set")
            self.assertNotIn("x-remove", echoed["headers"])
            self.assertEqual(echoed["query"], "keep=2&trace=hooked")
            r = client.exec(f'wget -qO- "http://other.test/echo/{MARKER}-cb"')
            self.assertEqual(json.loads(r.stdout)["headers"]["x-from-callback"], "python")
            r = client.exec(f'wget -qO- "http://other.test/echo/{MARKER}-after"')
            self.assertEqual(r.stdout, '{"msg":"from-callback"}')
            r = client.exec(f'wget -qO- "http://other.test/echo/{MARKER}-leak" --header "X-Key: $MY_KEY"')
            self.assertNotEqual(r.exit_code, 0, "the placeholder must not go to another host")
            r = client.exec("wget -qO- http://glob.test/ 2>&1")
            self.assertNotEqual(r.exit_code, 0, "hosts outside the allow-list are blocked")
            self.assertIn(("before", "other.test", f"/echo/{MARKER}-cb"), callbacks)
            self.assertIn(("after", "other.test", 200), callbacks)
        client.remove()


if __name__ == "__main__":
    unittest.main(verbosity=2)
