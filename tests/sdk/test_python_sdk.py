"""The original project's Python SDK (PyPI `matchlock`, unchanged) against `matchlock rpc`.

Run by crates/matchlock/tests/sdk.rs, which sets MATCHLOCK_BIN, an isolated HOME, the
test images (MATCHLOCK_TEST_IMAGE: Debian with python3; MATCHLOCK_TEST_BUSYBOX) and
PYTHONPATH (the SDK installed by scripts/install-python-sdk.sh).
"""

import io
import os
import socket
import subprocess
import threading
import time
import unittest

from matchlock import (
    Client,
    ImageConfig,
    MatchlockError,
    RPCError,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)

IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
BUSYBOX = os.environ["MATCHLOCK_TEST_BUSYBOX"]
BIN = os.environ["MATCHLOCK_BIN"]


def cli(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedSandbox(unittest.TestCase):
    """Checks that can share one VM (Debian image, memory workspace)."""

    @classmethod
    def setUpClass(cls):
        cls.client = Client()
        cls.client.start()
        sandbox = (
            Sandbox(IMAGE)
            .with_cpus(1)
            .with_workspace("/workspace")
            .mount_memory("/workspace")
            .with_env("PLAIN_ENV", "from-builder")
        )
        cls.vm_id = cls.client.launch(sandbox)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.client.remove()
        listed = cli("list")
        assert cls.vm_id not in listed.stdout, listed.stdout

    def test_exec_output_exit_code_and_dir(self):
        r = self.client.exec("echo hello; echo err >&2; exit 3")
        self.assertEqual((r.stdout, r.stderr, r.exit_code), ("hello\n", "err\n", 3))
        self.assertEqual(self.client.exec("pwd").stdout, "/workspace\n", "workspace is the default dir")
        self.assertEqual(self.client.exec("pwd", working_dir="/tmp").stdout, "/tmp\n")
        r = self.client.exec("cat /nonexistent")
        self.assertIn("No such file or directory", r.stderr)
        self.assertEqual(self.client.exec("echo $PLAIN_ENV").stdout, "from-builder\n")
        self.assertEqual(len(self.client.exec("seq 1 1000").stdout.splitlines()), 1000)

    def test_exec_stream_pipe_and_tty(self):
        out, err = io.StringIO(), io.StringIO()
        r = self.client.exec_stream("echo streamed; echo to-err >&2", stdout=out, stderr=err)
        self.assertEqual((r.exit_code, out.getvalue(), err.getvalue()), (0, "streamed\n", "to-err\n"))
        out = io.StringIO()
        r = self.client.exec_pipe("tr a-z A-Z; echo done", stdin=io.BytesIO(b"piped input\n" * 2000), stdout=out)
        self.assertEqual(r.exit_code, 0)
        self.assertEqual(out.getvalue(), "PIPED INPUT\n" * 2000 + "done\n")
        out = io.StringIO()
        r = self.client.exec_interactive("tty; stty size", stdout=out, rows=33, cols=101)
        self.assertEqual(r.exit_code, 0)
        self.assertIn("/dev/pts/", out.getvalue())
        self.assertIn("33 101", out.getvalue())
        out = io.StringIO()
        r = self.client.exec_interactive("sleep 2; stty size", stdout=out, resize=[(50, 132)])
        self.assertEqual((r.exit_code, out.getvalue().strip()), (0, "50 132"), "resized while running")
        out = io.StringIO()
        r = self.client.exec_pipe("id -u", stdout=out, user="nobody")
        self.assertEqual(out.getvalue(), "65534\n")

    def test_files_round_trip(self):
        payload = os.urandom(100 * 1024)
        self.client.write_file("/workspace/dir/big.bin", payload)
        self.assertEqual(self.client.read_file("/workspace/dir/big.bin"), payload)
        self.client.write_file("/workspace/a.txt", "a")
        self.client.write_file("/workspace/b.txt", b"b")
        names = [f.name for f in self.client.list_files("/workspace")]
        self.assertTrue({"a.txt", "b.txt", "dir"} <= set(names), names)
        entry = next(f for f in self.client.list_files("/workspace") if f.name == "dir")
        self.assertTrue(entry.is_dir)
        self.assertTrue(entry.mode & (1 << 31), "Go os.ModeDir bit")
        self.client.write_file("/tmp/run.sh", "#!/bin/sh\necho script-ran\n", mode=0o755)
        self.assertEqual(self.client.exec("/tmp/run.sh").stdout, "script-ran\n")
        self.assertEqual(self.client.exec("stat -c %a /tmp/run.sh").stdout, "755\n")
        with self.assertRaises(RPCError) as e:
            self.client.read_file("/nonexistent/file")
        self.assertEqual(e.exception.code, -32002)

    def test_timeout_cancels_and_kills_the_process(self):
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            self.client.exec("touch /tmp/cancel-marker; sleep 60", timeout=1)
        self.assertLess(time.monotonic() - started, 5)
        time.sleep(2)
        r = self.client.exec(
            "test -f /tmp/cancel-marker && echo marker; cat /proc/[0-9]*/comm | grep -x sleep || echo gone"
        )
        self.assertEqual(r.stdout, "marker\ngone\n")
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            self.client.exec_stream("sleep 60", stdout=io.StringIO(), timeout=1)
        self.assertLess(time.monotonic() - started, 5)

    def test_port_forward(self):
        # Commands run in their own PID namespace: the server lives as long as its exec.
        server = threading.Thread(
            target=self.client.exec,
            args=(
                "python3 -c \"import socket\n"
                "s=socket.socket();s.bind(('127.0.0.1',8080));s.listen()\n"
                "c,_=s.accept();c.sendall(c.recv(100).upper());c.close()\"",
            ),
            kwargs={"timeout": 60},
        )
        server.start()
        port = free_port()
        bindings = self.client.port_forward(f"{port}:8080")
        self.assertEqual([(b.address, b.local_port, b.remote_port) for b in bindings], [("127.0.0.1", port, 8080)])
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                    c.sendall(b"ping through the forward")
                    reply = c.recv(100)
                if reply:
                    break
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "the guest server never answered")
            time.sleep(0.2)
        self.assertEqual(reply, b"PING THROUGH THE FORWARD")
        server.join()

    def test_log(self):
        self.assertIsInstance(self.client.log(), str)
        with self.assertRaises(TimeoutError):
            self.client.log_stream(stdout=io.StringIO(), timeout=0.5)


class Lifecycle(unittest.TestCase):
    def test_entrypoint_user_workdir_and_image_config(self):
        with Client() as client:
            client.launch(
                Sandbox(BUSYBOX)
                .with_user("65534:65534")
                .with_image_config(ImageConfig(working_dir="/tmp", env={"STREAM_VAR": "img-env"}))
                .with_entrypoint("sh", "-c", "echo first; sleep 2; echo second")
            )
            r = client.exec("id -u; id -g; pwd; echo $STREAM_VAR; touch /root/x 2>/dev/null || echo denied")
            self.assertEqual(r.stdout, "65534\n65534\n/tmp\nimg-env\ndenied\n")
            deadline = time.monotonic() + 15
            while "second" not in client.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            self.assertIn("first", client.log())
            self.assertIn("second", client.log())
            vm_id = client.vm_id
        client.remove()
        self.assertNotIn(vm_id, cli("list").stdout)

    def test_failing_entrypoint_and_unknown_image(self):
        with Client() as client:
            with self.assertRaises(RPCError) as e:
                client.launch(Sandbox(BUSYBOX).with_entrypoint("sh", "-c", "exit 3"))
            self.assertIn("start image entrypoint: exit code 3", e.exception.message)
            with self.assertRaises(RPCError) as e:
                client.create(Sandbox("no-such-image:latest").options())
            self.assertEqual(e.exception.code, -32000)
        self.assertEqual(cli("list").stdout.count("vm-"), 0, "failed creates leave no VM behind")

    def test_concurrent_sandboxes(self):
        results = []

        def one(n):
            with Client() as client:
                client.launch(Sandbox(BUSYBOX).with_env("N", str(n)))
                results.append(client.exec("echo hello $N").stdout)
            client.remove()

        threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), ["hello 0\n", "hello 1\n"])

    def test_volumes(self):
        client = Client()
        v = client.volume_create("sdkvol", 16)
        self.assertEqual((v.name, v.size), ("sdkvol", "16.0 MB"))
        self.assertTrue(v.path)
        self.assertIn("sdkvol", [x.name for x in client.volume_list()])
        client.volume_remove("sdkvol")
        self.assertNotIn("sdkvol", [x.name for x in client.volume_list()])
        with self.assertRaises(subprocess.CalledProcessError) as e:
            client.volume_remove("sdkvol")
        self.assertIn("named volume not found", e.exception.stderr)


class VfsHooks(unittest.TestCase):
    def test_block_mutate_and_after_hooks(self):
        after_runs = []
        dangerous_runs = []

        def after(event):
            after_runs.append(event.path)
            # Writing from the hook makes new events; they must not re-run this hook.
            client.write_file("/workspace/after-hook.txt", "from hook")

        def dangerous(c, event):
            dangerous_runs.append(event.path)
            if len(dangerous_runs) == 1:
                c.exec("echo hook >> /workspace/hook.log")

        config = VFSInterceptionConfig(
            rules=[
                VFSHookRule(name="block", phase="before", ops=["create"], path="/workspace/blocked.txt", action="block"),
                VFSHookRule(name="mutate", ops=["write"], path="/workspace/mutate.txt",
                            mutate_hook=lambda req: "mutated-by-hook"),
                VFSHookRule(name="gate", ops=["read"], path="/workspace/secret.txt",
                            action_hook=lambda req: "block"),
                VFSHookRule(name="after", phase="after", ops=["write"], path="/workspace/trigger.txt", hook=after),
                VFSHookRule(name="danger", phase="after", ops=["write"], path="/workspace/danger.txt",
                            dangerous_hook=dangerous),
            ]
        )
        with Client() as client:
            client.launch(Sandbox(BUSYBOX).with_workspace("/workspace").mount_memory("/workspace")
                          .with_vfs_interception(config))
            with self.assertRaises(RPCError):
                client.write_file("/workspace/blocked.txt", "x")
            r = client.exec("echo x > /workspace/blocked.txt")
            self.assertIn("Operation not permitted", r.stderr)
            client.write_file("/workspace/ok.txt", "ok")
            client.write_file("/workspace/mutate.txt", "original")
            self.assertEqual(client.read_file("/workspace/mutate.txt"), b"mutated-by-hook")
            with self.assertRaises(MatchlockError):
                client.read_file("/workspace/secret.txt")
            client.write_file("/workspace/trigger.txt", "go")
            client.write_file("/workspace/danger.txt", "go")
            deadline = time.monotonic() + 10
            while (not after_runs or not dangerous_runs) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            self.assertEqual(after_runs, ["/workspace/trigger.txt"], "the safe hook ran once")
            self.assertEqual(client.read_file("/workspace/after-hook.txt"), b"from hook")
            self.assertGreaterEqual(len(dangerous_runs), 1)
            self.assertEqual(client.exec("cat /workspace/hook.log").stdout, "hook\n")
        client.remove()


if __name__ == "__main__":
    unittest.main(verbosity=2)
